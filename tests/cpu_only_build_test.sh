#!/usr/bin/env bash
# ctest `cpu_only_build` (label build): the CPU-only configuration (-DDTRAIN_WITH_CUDA=OFF) still configures and
# its sources with CUDA/CPU branches still compile warning-free, in a CUDA build tree where nothing else builds
# them (a CPU-only dtrain was broken once by a variable only the CUDA branch used). Configures a scratch tree with
# CUDA off and runs, for each source that reads DTRAIN_WITH_CUDA (lib/common/config.h, lib/nn/cuda_impl.h), that
# tree's own compile command with -fsyntax-only (-Werror: every front-end warning; nothing is linked). The CUDA
# include folders are not on those commands, so a CUDA header reached outside `#if DTRAIN_WITH_CUDA` fails too.
# Skips (77) when the build under test is itself CPU-only (its own build is then the check).
#   tests/cpu_only_build_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
build=$1 src=$2
grep -q '^DTRAIN_WITH_CUDA:BOOL=ON' "$build/CMakeCache.txt" || { echo "skipped: this build is CPU-only already"; exit 77; }
tree=$(mktemp -d /tmp/dtrain-cpu-only-XXXXXX)
trap 'rm -rf "$tree"' EXIT
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
t0=$(date +%s)
if ! cmake -S "$src" -B "$tree" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DDTRAIN_WITH_CUDA=OFF -DDTRAIN_WERROR=ON \
     -DCMAKE_EXPORT_COMPILE_COMMANDS=ON > "$tree/configure.log" 2>&1; then
  echo "FAILED: configuring with -DDTRAIN_WITH_CUDA=OFF:"; tail -30 "$tree/configure.log"; exit 1
fi
grep -q 'cuda=OFF' "$tree/configure.log" || { echo "FAILED: the scratch tree did not configure CPU-only"; exit 1; }
echo "configured CPU-only in $(( $(date +%s) - t0 )) s"
# The sources with CUDA/CPU branches, found rather than listed, so a new one is covered without editing this.
mapfile -t files < <(cd "$src" && grep -rlE 'DTRAIN_WITH_CUDA|lib/nn/cuda_impl.h|lib/common/config.h' \
  --include='*.cpp' apps lib rendezvous tests | grep -v '^lib/nn/cuda/' | sort)
[ "${#files[@]}" -gt 0 ] || { echo "FAILED: no source with a CUDA branch found"; exit 1; }
python3 - "$tree/compile_commands.json" "$src" "${files[@]}" <<'PY'
import concurrent.futures, json, os, shlex, subprocess, sys, time
db, src, files = sys.argv[1], sys.argv[2], sys.argv[3:]
entries = {os.path.relpath(e["file"], src): e for e in json.load(open(db))}
missing = [f for f in files if f not in entries]
if missing:
    # A source the CPU-only build does not compile at all (a CUDA-only file) needs no check.
    print("not in the CPU-only build (CUDA-only):", " ".join(missing))
todo = [entries[f] for f in files if f in entries]
def check(e):
    args = shlex.split(e["command"]) if "command" in e else list(e["arguments"])
    args = [a for a in args if a != "ccache" and not a.endswith("/ccache")]
    out = []
    skip = 0
    for a in args:  # no object and no depfile: the scratch tree's object folders do not exist
        if skip:
            skip -= 1
        elif a in ("-o", "-MT", "-MF", "-MQ"):
            skip = 1
        elif a not in ("-MD", "-MMD"):
            out.append(a)
    args = out
    t = time.time()
    r = subprocess.run(args + ["-fsyntax-only"], cwd=e["directory"], capture_output=True, text=True)
    return os.path.relpath(e["file"], src), r, time.time() - t
failed = 0
with concurrent.futures.ThreadPoolExecutor(int(os.environ.get("DTRAIN_TEST_CPU_ONLY_JOBS", "2"))) as pool:
    for name, r, secs in pool.map(check, todo):
        print(f"{'ok' if r.returncode == 0 else 'FAILED'}: {name} ({secs:.0f} s)")
        if r.returncode != 0:
            failed = 1
            print(r.stdout[-4000:] + r.stderr[-4000:])
sys.exit(failed)
PY
rc=$?
echo "cpu_only_build: $([ $rc -eq 0 ] && echo ok || echo FAILED) in $(( $(date +%s) - t0 )) s"
exit $rc
