"""What the build and its checks need to know about the machine, with the standard library only:
setup.py loads this file by path (geokern is not installed yet, torch may be absent), the
package and the tests import it."""

import os
import re
import shutil


def read_wrapper_target(path):
    """If `path` is a small shell script that execs a real nvcc, return that nvcc."""
    try:
        if os.path.getsize(path) > 64 * 1024:
            return None
        with open(path, "r", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"(/\S+/bin/nvcc)\b", text)
    return m.group(1) if m and os.path.isfile(m.group(1)) else None


def find_cuda_home():
    """The real toolkit, so that a wrapper `nvcc` on PATH does not mislead torch.

    torch guesses CUDA_HOME as dirname(dirname(which nvcc)); on machines where nvcc on
    PATH is a wrapper script outside the toolkit this yields e.g. /usr/local and the
    link fails with `cannot find -lcudart`. Order: $CUDA_HOME / $CUDA_PATH, the standard
    /usr/local/cuda, the toolkit a wrapper script calls, the nvcc binary's own folder.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = read_wrapper_target(nvcc) or os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.isdir(os.path.join(home, "include")):
            return home
    return None


def torch_release(version):
    """(major, minor) of a torch version string: '2.11.0+cu130' -> (2, 11)."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


def stable_target_macro(torch_min):
    """TORCH_TARGET_VERSION for a release 'M.m': torch's 0xMMmmpp... encoding, so that the stable
    API offers nothing newer than that release."""
    major, minor = torch_release(torch_min)
    return f"0x{major:02x}{minor:02x}000000000000ULL"
