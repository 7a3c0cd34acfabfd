"""A stand-in PDF child that dies from a signal, as a reader crashing on a hostile file would."""

import os
import signal
import sys

sys.stdin.buffer.read()
os.kill(os.getpid(), signal.SIGSEGV)
