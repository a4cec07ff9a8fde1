"""Run mnist_net.py here as it would run on another machine: that machine's missing pieces taken
away inside this one process, so that what a learner there sees can be seen, and tested, on Linux.

    python3 -m tools.as_platform PLAY [mnist_net.py's flags]

PLAY is one of:
  windows          no fork (os.fork gone, no 'fork' start method), sys.platform 'win32'
  macos            sys.platform 'darwin' (fork exists, but is not safe after Accelerate or threads)
  arm              an aarch64 CPU (the mailboxes' handover is proven on x86-64 only)
  mkl              NumPy's BLAS is MKL, not OpenBLAS
  no-threadpoolctl threadpoolctl not installed (the BLAS threads cannot be set)
  threads          another thread alive when the network is built
  no-worker        the worker process cannot start (its fork fails with EAGAIN, as under a
                   process limit)
  one-process      two processes allowed nowhere (the fast path's one-process speed)

The facts two_processes.py decides by all come from two_processes.platform_facts(); this
replaces that one function, and takes away the real pieces where the play says so.  Nothing
else of the program changes: its numbers, its log and its messages are the real ones.
"""
import errno
import multiprocessing
import os
import sys
import threading
import time

PLAYS = ("windows", "macos", "arm", "mkl", "no-threadpoolctl", "threads", "no-worker", "one-process")


def play(name):
    """Take away, in this process, what machine `name` lacks (see the module's docstring)."""
    import two_processes
    real = two_processes.platform_facts
    changes = {"windows": {"system": "win32", "start_methods": ["spawn"], "fork": False},
               "macos": {"system": "darwin", "start_methods": ["spawn", "fork", "forkserver"]},
               "arm": {"machine": "aarch64"},
               "mkl": {"blas": ("mkl",)}}.get(name, {})
    if name == "windows":
        del os.fork
        real_context = multiprocessing.get_context

        def get_context(method=None):
            if method in ("fork", "forkserver"):
                raise ValueError(f"cannot find context for {method!r}")
            return real_context(method)
        multiprocessing.get_context = get_context
        multiprocessing.get_all_start_methods = lambda: ["spawn"]
    elif name == "no-threadpoolctl":
        sys.modules["threadpoolctl"] = None            # import threadpoolctl: ImportError
        two_processes.blas_libraries.cache_clear()
    elif name == "threads":
        threading.Thread(target=time.sleep, args=(3600,), name="another", daemon=True).start()
    elif name == "no-worker":
        def no_fork(self):
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable (fork)")
        multiprocessing.get_context("fork").Process.start = no_fork
    elif name == "one-process":
        two_processes.why_one_process = lambda *args, **kwargs: "played: tools.as_platform one-process"
    if changes:
        two_processes.platform_facts = lambda: dict(real(), **changes)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in PLAYS:
        print(f"usage: python3 -m tools.as_platform {{{','.join(PLAYS)}}} [mnist_net.py's flags]",
              file=sys.stderr)
        return 2
    play(argv[0])
    import mnist_net
    return mnist_net.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
