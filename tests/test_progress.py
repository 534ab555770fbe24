"""Progress bars of the long evaluation steps: drawn on a terminal (a real pseudo-terminal here), absent when
stderr is a pipe or a file (CI, DVC, logs)."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

SCRIPT = ("import torch\n"
          "from lightning_modules.common.ais import ais_log_z\n"
          "step = lambda v, b0, b1: (torch.zeros(len(v)), v)\n"
          "r = ais_log_z(step, lambda n: torch.zeros(n, 1), 0.0, torch.linspace(0, 1, 50), 4)\n"
          "print('log_z', r.log_z)\n")


def test_no_bar_when_stderr_is_not_a_terminal():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "log_z 0.0" and out.stderr == ""


def test_a_bar_on_a_terminal():
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the pseudo-terminal, given 80 columns
        fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.execv(sys.executable, [sys.executable, "-c", SCRIPT])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "AIS:" in text and "/49" in text and "log_z 0.0" in text
