"""Run tools/train_net.py with this process killed by SIGKILL at a chosen point (a test aid).

    python tests/engine/crash_driver.py POINT N [train_net.py arguments ...]

POINT N:
  step N  killed right after the optimizer step of iteration N, before its hooks run
          (so no checkpoint of iteration N exists);
  save N  killed half way through writing the N-th checkpoint file of this process
          (a partial temporary file is left behind);
  tag N   killed after the N-th checkpoint file is complete, before ``last_checkpoint``
          points to it.
"""
import io
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    from regionclip_d2.checkpoint import loading
    from regionclip_d2.engine import train_loop

    calls = {"save": 0, "tag": 0}
    if point == "step":
        run_step = train_loop.GuardedTrainer.run_step

        def step(self):
            run_step(self)
            if self.iter == n:
                die()
        train_loop.GuardedTrainer.run_step = step
    elif point == "save":
        atomic_write = loading._atomic_write

        def write(path, fn, mode):
            if not path.endswith(".pth"):
                return atomic_write(path, fn, mode)
            calls["save"] += 1
            if calls["save"] < n:
                return atomic_write(path, fn, mode)

            def half(f):
                buf = io.BytesIO()
                fn(buf)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return atomic_write(path, half, mode)
        loading._atomic_write = write
    elif point == "tag":
        tag = loading.RegionCLIPCheckpointer.tag_last_checkpoint

        def tag_last(self, name):
            calls["tag"] += 1
            if calls["tag"] == n:
                die()
            return tag(self, name)
        loading.RegionCLIPCheckpointer.tag_last_checkpoint = tag_last
    else:
        raise SystemExit(f"unknown point {point!r}: use step, save or tag")
    sys.argv = [os.path.join(ROOT, "tools", "train_net.py")] + argv
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
