from .datasets import register_coco_format, register_ovd_builtins

register_ovd_builtins()
