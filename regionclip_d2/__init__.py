"""regionclip_d2"""
