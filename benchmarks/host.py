"""What a benchmark row needs to name its machine: the CPU (model, family/model numbers, the vector
flags that decide which kernels XLA and PyTorch use), the load, the date and the commit. Not a
benchmark itself."""
import datetime
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The instruction-set flags that change which kernels the libraries pick (oneDNN, XNNPACK, Eigen).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_bf16", "amx_tile", "avx_vnni")


def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def cpu() -> str:
    """'AMD EPYC (family 25 model 1), 2 cores, avx2 fma' style: the row's CPU."""
    info = _lscpu()
    flags = set(info.get("Flags", "").split())
    vec = " ".join(f for f in VECTOR_FLAGS if f in flags) or "no AVX2"
    return (f"{info.get('Model name', 'unknown CPU')} (family {info.get('CPU family', '?')} model "
            f"{info.get('Model', '?')}), {os.cpu_count()} cores, {vec}")


def load() -> str:
    try:
        return "load avg " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load unknown"


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + ("+uncommitted changes" if dirty else "")


def stamp() -> str:
    """date, commit, CPU: the three things every RESULTS.md row states."""
    return f"{datetime.date.today().isoformat()}, commit {commit()}, {cpu()}"


def pin(threads):
    """Run this process on the first `threads` CPUs (None: leave it). Call before JAX starts: XLA
    sizes its CPU thread pool from the CPUs the process may use. Give PyTorch the same count with
    torch.set_num_threads. On a host loaded by other jobs, 1 thread on each side keeps PyTorch's
    spinning OpenMP pool from collapsing (with 2 threads there it ran 20-50x slower), so ratios mean
    something."""
    if threads:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
