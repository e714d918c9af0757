"""A state directory whose power can be cut: ext4 on a loop device, and a cut that keeps only what reached
the device.

    disk = PowerCutDisk(tmp_path / "disk.img", tmp_path / "state").attach()
    ... run the daemon with its state directory on disk.mount ...
    disk.cut(daemon.proc)   # freeze the daemon, keep the device as it is now, kill the daemon
    disk.attach()           # the same directory again, as a reboot would find it
    disk.close()

What a power cut leaves is what the block device holds: data a process wrote and the kernel had not yet
written back (the page cache, SQLite's unsynced writes) is gone. The loop device writes to its image file
only when the file system above it writes back or flushes (fsync), so a copy of the image file taken at
the cut is the disk after the outage. The daemon is stopped (SIGSTOP) first, so no new write starts during
the copy; then the copy; then SIGKILL, then the old mount is discarded (its write-back goes to the old image,
not to the copy). The copy is not atomic against the kernel's own write-back of older dirty pages, as a disk
with a volatile cache is not either.

Needs root, losetup, mkfs.ext4 and mount (util-linux, e2fsprogs): ``available()`` says why not otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

SIZE = 96 * 2**20


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def available() -> str | None:
    """None when a loop-mounted ext4 can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/dev/loop-control").exists():
        return "no loop devices (/dev/loop-control)"
    return None


class PowerCutDisk:
    def __init__(self, image: Path, mount: Path) -> None:
        self.image = image
        self.mount = mount
        self.device: str | None = None
        self.cuts = 0

    def attach(self) -> PowerCutDisk:
        """Mount the image at ``mount`` (made and formatted on first use)."""
        if not self.image.exists():
            with open(self.image, "wb") as f:
                f.truncate(SIZE)
            _run("mkfs.ext4", "-q", "-F", str(self.image))
        self.mount.mkdir(parents=True, exist_ok=True)
        self.device = _run("losetup", "--find", "--show", str(self.image))
        try:
            _run("mount", "-t", "ext4", self.device, str(self.mount))
        except Exception:
            _run("losetup", "--detach", self.device)
            self.device = None
            raise
        return self

    def cut(self, proc: subprocess.Popen) -> None:
        """Cut the power under ``proc``: it stops, and the disk keeps only what reached the device."""
        proc.send_signal(signal.SIGSTOP)
        self.cuts += 1
        survivor = self.image.with_name(f"{self.image.stem}.cut{self.cuts}{self.image.suffix}")
        shutil.copyfile(self.image, survivor)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.detach()
        self.image.unlink()
        survivor.rename(self.image)

    def detach(self) -> None:
        if self.device is None:
            return
        for umount in (["umount"], ["umount", "--lazy"]):
            if subprocess.run([*umount, str(self.mount)], capture_output=True, timeout=60).returncode == 0:
                break
        subprocess.run(["losetup", "--detach", self.device], capture_output=True, timeout=60, check=False)
        self.device = None

    def close(self) -> None:
        self.detach()
        self.image.unlink(missing_ok=True)
