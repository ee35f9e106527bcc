#!/usr/bin/env python3
"""The build-from-source half of the GPU kit (scripts/gpu-check; docs/gpu.md "scripts/gpu-check").

The GPU machine has nvcc and g++ but no Debian -dev packages (no fmt, Eigen, Boost, nlohmann/json, CLI11, doctest
or zlib headers) and perhaps no cmake or ninja. So the kit carries, beside prebuilt binaries:
  deps/include/   every header the build read from outside the source tree, the compiler and the CUDA toolkit
                  (found through ninja's dependency log, so exactly what is used: Boost's subset, not all of it);
  deps/cuda/      the CUDA-side headers the build read that a bare nvcc install may lack (cuBLAS, NCCL), used
                  only after the GPU machine's own;
  deps/lib/       the libraries linked from the system (libfmt, libz);
  build/          the CMake-generated files the sources include (generated/lib/common/config.h);
  commands.json   the build's own commands (`ninja -t commands`), with paths made relative to $SRC (the source
                  tree), $KIT, $CUDA_HOME and the directories holding NCCL and cuBLAS there.

  gpu_kit.py pack BUILD_DIR KIT TARGET...   on the build machine, after building TARGETs in BUILD_DIR
  gpu_kit.py build KIT SRC OUT [--preprocess-only | --link-from BUILD_DIR]
                                            on the GPU machine: runs the commands (compiles in parallel), leaving
                                            the binaries in OUT (OUT/apps/dtrain/dtrain, OUT/tests/gpu/test_gpu*);
                                            --preprocess-only runs each compile as -E and links nothing: it proves
                                            every header is found, in a fraction of the time (scripts/gpu-kit-sim);
                                            --link-from takes the objects the kit's own build compiled and runs only
                                            the archive and link steps: it proves the link commands and libraries

Exit: 0 done; 1 a command failed (its output is printed); 2 bad usage or nothing to build with.
"""
import concurrent.futures
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

SYSTEM_INCLUDE = "/usr/include/"
SYSTEM_LIBS = ("/usr/lib/x86_64-linux-gnu/", "/lib/x86_64-linux-gnu/")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def owned_by_toolchain():
    """Headers the GPU machine has wherever g++ is installed: glibc's, the kernel's and libstdc++'s."""
    files = set()
    pkgs = [p for p in run(["dpkg-query", "-W", "-f", "${Package}\n"]).split()
            if p in ("libc6-dev", "linux-libc-dev") or re.fullmatch(r"libstdc\+\+-\d+-dev|libgcc-\d+-dev", p)]
    for line in run(["dpkg", "-L"] + pkgs).splitlines():
        files.add(os.path.realpath(line))
    return files


def soname(path):
    out = run(["readelf", "-d", path])
    m = re.search(r"\(SONAME\)\s+Library soname: \[(.+?)\]", out)
    return m.group(1) if m else os.path.basename(path)


def pack(build, kit, targets):
    build, kit = os.path.realpath(build), os.path.realpath(kit)
    cache = open(os.path.join(build, "CMakeCache.txt")).read()
    src = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache, re.M).group(1)
    cuda = re.search(r"^DTRAIN_CUDA_ROOT:PATH=(.*)$", cache, re.M).group(1).rstrip("/")
    deps = os.path.join(kit, "deps")
    shutil.rmtree(deps, ignore_errors=True)
    for d in ("include", "cuda", "lib"):
        os.makedirs(os.path.join(deps, d))

    # Headers: every dependency ninja recorded for the objects the targets are made of, outside the sources, the
    # build tree and the toolchain. (`ninja -t deps TARGET` is not transitive: for a linked target it lists
    # nothing, so the log is read whole and filtered by the objects of the targets' compile commands.)
    toolchain = owned_by_toolchain()
    raw_commands = run(["ninja", "-C", build, "-t", "commands"] + targets).splitlines()
    objects = {m.group(1) for c in raw_commands if " -c " in c for m in [re.search(r" -o (\S+)", c)] if m}
    headers = set()
    current = None
    for line in run(["ninja", "-C", build, "-t", "deps"]).splitlines():
        if not line.startswith(" "):
            current = line.split(":", 1)[0] if line.strip() else None
        elif current in objects:
            headers.add(os.path.normpath(line.strip()))
    if not any(h.startswith(SYSTEM_INCLUDE) for h in headers):
        raise SystemExit(f"gpu_kit: no header dependency recorded for the {len(objects)} objects of {targets} in "
                         f"{build}: build them with Ninja first")
    cuda_real = os.path.realpath(cuda)
    copied = {"include": 0, "cuda": 0}
    for h in sorted(headers):
        real = os.path.realpath(h)
        if h.startswith(SYSTEM_INCLUDE) and real not in toolchain:
            dst, kind = os.path.join(deps, "include", h[len(SYSTEM_INCLUDE):]), "include"
        elif (h.startswith(cuda + "/") or real.startswith(cuda_real + "/")) and \
                re.search(r"/(cublas[^/]*|nccl[^/]*|nccl_net)\.h$", h):
            dst, kind = os.path.join(deps, "cuda", os.path.basename(h)), "cuda"
        else:
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(real, dst)
        copied[kind] += 1

    # Commands in ninja's order; paths rewritten to variables the GPU machine fills in.
    libs = {}  # system library path -> replacement
    commands = []
    for line in raw_commands:
        line = line.replace("/usr/bin/ccache ", "").replace("ccache ", "")
        line = re.sub(r"(\S+/cmake) -E rm -f", "rm -f", line)
        if "cmake -E" in line:
            raise SystemExit(f"gpu_kit: a cmake -E command other than rm -f needs a rule here: {line[:200]}")
        for tok in set(shlex.split(line.replace("&&", " "))):
            if tok.startswith(SYSTEM_LIBS) and re.search(r"\.(so[.\d]*|a)$", tok):
                name = os.path.basename(tok)
                shutil.copy2(os.path.realpath(tok), os.path.join(deps, "lib", name))
                if name.startswith("libfmt.so"):  # the runtime soname beside it, for the kit's lib/
                    shutil.copy2(os.path.realpath(tok), os.path.join(deps, "lib", soname(tok)))
                libs[tok] = "$KIT/deps/lib/" + name
            elif tok.startswith(cuda + "/lib") and re.search(r"\.so[.\d]*$", tok):
                # CUDA libraries by soname, found on -L paths ($CUDA_LIBS: the toolkit's and the nvidia wheels').
                libs[tok] = "-l:" + soname(os.path.realpath(tok)) if "nccl" not in tok else "-l:libnccl.so.2"
        for old in sorted(libs, key=len, reverse=True):
            line = line.replace(old, libs[old])
        # The build tree first: it may sit inside the sources (build/), and its paths become relative to OUT.
        line = line.replace(build + "/", "").replace(build, ".").replace(src, "$SRC")
        # -isystem /usr/include/eigen3 and the like: the kit's copy.
        line = re.sub(r"(-I|-isystem |-idirafter )/usr/include/", r"\1$KIT/deps/include/", line)
        line = re.sub(r"(^|&& )/usr/bin/c\+\+ ", r"\1$CXX ", line)
        line = line.replace(cuda + "/bin/nvcc", "$CUDA_HOME/bin/nvcc").replace(cuda + "/include", "$CUDA_HOME/include")
        line = line.replace(cuda + "/", "$CUDA_HOME/")
        commands.append(line)
    # The generated headers (configure_file) travel as they are.
    gen = os.path.join(kit, "build", "generated")
    shutil.rmtree(os.path.join(kit, "build"), ignore_errors=True)
    shutil.copytree(os.path.join(build, "generated"), gen)
    json.dump({"targets": targets, "commands": commands}, open(os.path.join(kit, "commands.json"), "w"), indent=0)
    print(f"gpu_kit: {len(commands)} commands, {copied['include']} headers in deps/include, {copied['cuda']} in "
          f"deps/cuda, libraries: {' '.join(sorted(os.listdir(os.path.join(deps, 'lib'))))}")


def nvidia_dirs(sub):
    """site-packages/nvidia/*/<sub> of the python3 that runs this (PyTorch's CUDA wheels)."""
    out = []
    for base in sys.path:
        out += sorted(glob.glob(os.path.join(base, "nvidia", "*", sub)))
    return out


def preprocess_only(cmd):
    """The compile command `cmd` with -c replaced by -E, its output discarded and no depfile written."""
    cmd = re.sub(r" -c ", " -E ", cmd, count=1)
    cmd = re.sub(r" -M[TF] \S+| -MM?D(?= )", "", cmd)  # no depfile: nvcc refuses -MD with -E
    return re.sub(r" -o \S+", " -o /dev/null", cmd, count=1)


def build(kit, src, out, preprocess=False, link_from=None):
    kit, src, out = (os.path.realpath(p) for p in (kit, src, out))
    spec = json.load(open(os.path.join(kit, "commands.json")))
    cuda = os.environ.get("CUDA_HOME") or next((d for d in ("/usr/local/cuda",) if os.path.isdir(d)), None)
    nvcc = shutil.which("nvcc") or (cuda and os.path.join(cuda, "bin", "nvcc"))
    if not cuda or not nvcc or not os.path.exists(nvcc):
        print("gpu_kit build: no CUDA toolkit (set CUDA_HOME to the folder with bin/nvcc)", file=sys.stderr)
        return 2
    if cuda and not os.path.exists(os.path.join(cuda, "bin", "nvcc")):
        cuda = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    lib_dirs = [d for d in (os.path.join(cuda, "lib64"), os.path.join(cuda, "lib")) if os.path.isdir(d)]
    lib_dirs += nvidia_dirs("lib")
    inc_dirs = [os.path.join(kit, "deps", "include")] + nvidia_dirs("include") + [os.path.join(kit, "deps", "cuda")]
    # Versioned-only libraries (the wheels ship libnccl.so.2, libcublas.so.13): -l:NAME finds them on -L.
    link_flags = " ".join(f"-L{shlex.quote(d)} -Wl,-rpath,{shlex.quote(d)}" for d in lib_dirs)
    system_inc = " ".join(f"-isystem {shlex.quote(d)}" for d in inc_dirs)
    os.makedirs(out, exist_ok=True)
    shutil.copytree(os.path.join(kit, "build", "generated"), os.path.join(out, "generated"), dirs_exist_ok=True)
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        print("gpu_kit build: no C++ compiler (c++ or g++; or set CXX)", file=sys.stderr)
        return 2
    env = dict(os.environ, SRC=src, KIT=kit, CUDA_HOME=cuda, CXX=cxx)

    def expand(cmd):
        # Compilers get the kit's headers (searched after the command's own -I paths, before the system's); links
        # get the library folders.
        if " -c " in cmd or " -E " in cmd:
            return re.sub(r"^(\S+) ", lambda m: f"{m.group(1)} {system_inc} ", cmd, count=1)
        if " -o " in cmd and "$CXX " in cmd:
            return cmd.replace("$CXX ", f"$CXX {link_flags} ", 1)
        return cmd

    def one(cmd):
        for d in re.findall(r" -(?:o|MF) (\S+)", cmd):
            os.makedirs(os.path.join(out, os.path.dirname(d)), exist_ok=True)
        r = subprocess.run(["bash", "-c", expand(cmd)], cwd=out, env=env, capture_output=True, text=True)
        return cmd, r

    compiles = [c for c in spec["commands"] if " -c " in c and " -o " in c]
    rest = [c for c in spec["commands"] if c not in compiles]
    if preprocess:
        compiles, rest = [preprocess_only(c) for c in compiles], []
    if link_from:
        for c in compiles:
            obj = re.search(r" -o (\S+)", c).group(1)
            os.makedirs(os.path.join(out, os.path.dirname(obj)), exist_ok=True)
            shutil.copy2(os.path.join(link_from, obj), os.path.join(out, obj))
        print(f"gpu_kit build: {len(compiles)} objects taken from {link_from}")
        compiles = []
    jobs = os.cpu_count() or 4
    print(f"gpu_kit build: {len(compiles)} compiles on {jobs} cores, then {len(rest)} archive/link steps, in {out}")
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for cmd, r in pool.map(one, compiles):
            if r.returncode != 0:
                print(f"FAILED: {expand(cmd)[:2000]}\n{r.stdout}{r.stderr}", file=sys.stderr)
                return 1
    for cmd in rest:
        cmd, r = one(cmd)
        if r.returncode != 0:
            print(f"FAILED: {expand(cmd)[:2000]}\n{r.stdout}{r.stderr}", file=sys.stderr)
            return 1
    print("gpu_kit build: done")
    return 0


def main(argv):
    if len(argv) >= 4 and argv[0] == "pack":
        pack(argv[1], argv[2], argv[3:])
        return 0
    if len(argv) in (4, 5) and argv[0] == "build" and argv[4:] in ([], ["--preprocess-only"]):
        return build(argv[1], argv[2], argv[3], preprocess=len(argv) == 5)
    if len(argv) == 6 and argv[0] == "build" and argv[4] == "--link-from":
        return build(argv[1], argv[2], argv[3], link_from=argv[5])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
