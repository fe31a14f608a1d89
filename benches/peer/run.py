#!/usr/bin/env python3
"""`make bench-peer`: scenecast against the Python peer (benches/peer/caption.py: onnxruntime +
llama-cpp-python, the same models and prompt), on the same photos, in one run; then the daemon's
footprint.

1. Captions: each side runs as its own process over every sample photo, `--rounds` times,
   alternating. Printed: median caption latency (warm: every caption after a process's first),
   cold start to the first caption (process start, model load, first caption), peak resident
   memory (the process's VmHWM, from wait4) and peak proportional set size (PSS, sampled: a page
   mapped twice counts once, where RSS counts it per mapping), the ratios scenecast / Python
   against the issue's goals (latency <= 0.8, memory <= 0.6), and whether both wrote the same
   caption for each photo.
   The photos whose captions differ are captioned once more by the peer from scenecast's own
   pre-processed tensors (the `preprocess_dump` example): when it then writes scenecast's
   caption, the two pipelines parted before the encoders (decoding or resizing the image).
2. Footprint of `scenecast run --demo` on a static scene: resident memory (RSS and PSS) once
   running, CPU use over one idle minute, and peak memory after a render has loaded the generator.

    python benches/peer/run.py --cache DIR --scenecast PATH/TO/scenecast \
        --preprocess-dump PATH/TO/examples/preprocess_dump [--rounds 3] [--threads N]
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def pss(pid: int) -> float:
    """The process's proportional set size in MiB (`Pss` of /proc/PID/smaps_rollup): resident
    memory with each page counted once, however many mappings share it (RSS counts a file page
    once per mapping). NaN once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def run_captions(cmd: list[str], env: dict, only: list[Path] | None = None) -> tuple[list[dict], float, float, float]:
    """Runs one captioning process (on the photos `only`, in place of the command's own, if given);
    returns its JSON lines, the seconds to its first line, its peak resident memory (VmHWM) and
    its peak proportional set size (sampled every 100 ms), in MiB."""
    import threading

    if only is not None:
        cmd = [a for a in cmd if Path(a).suffix.lower() not in IMAGE_SUFFIXES] + [str(p) for p in only]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak_pss, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            value = pss(proc.pid)
            if value == value:
                peak_pss[0] = max(peak_pss[0], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines, first = [], None
    for line in proc.stdout:
        if first is None:
            first = time.perf_counter() - start
        lines.append(json.loads(line))
    done.set()
    sampler.join()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd[0]} failed:\n{stderr}")
    return lines, first or float("nan"), usage.ru_maxrss / 1024.0, peak_pss[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def footprint(scenecast: str, cache: Path, photo: Path, env: dict, idle_s: float) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "demo.toml"
        config.write_text(
            f'state_dir = "{tmp}"\n[models]\ncache_dir = "{cache}"\n[mqtt]\nport = {port}\ndevice = "peer"\n'
            f'[camera]\npath = "{photo}"\n'
        )
        proc = subprocess.Popen([scenecast, "--config", str(config), "run", "--demo"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, text=True)
        try:
            for line in proc.stdout:
                if "/caption [frame" in line:
                    break
            else:
                sys.exit("scenecast run --demo printed no caption")
            running = proc_status(proc.pid, "VmRSS")
            running_pss = pss(proc.pid)
            peak = proc_status(proc.pid, "VmHWM")
            before = cpu_seconds(proc.pid)
            time.sleep(idle_s)
            cpu = (cpu_seconds(proc.pid) - before) / idle_s * 100.0
            idle_rss = proc_status(proc.pid, "VmRSS")
            idle_pss = pss(proc.pid)
            rr = subprocess.run(
                ["mosquitto_rr", "-V", "mqttv5", "-p", str(port), "-t", "scenecast/peer/generate",
                 "-e", "bench/peer/reply", "-m", '{"prompt":"a cat on the left"}', "-W", "60", "-N"],
                capture_output=True, timeout=90,
            )
            if rr.returncode != 0 or not rr.stdout.startswith(b"\x89PNG"):
                sys.exit(f"the render request failed: {rr.stderr.decode()}")
            loaded = proc_status(proc.pid, "VmRSS")
            loaded_pss = pss(proc.pid)
            peak_gen = proc_status(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nscenecast run --demo on a static scene (camera.interval_s default, one frame encoded every 10 s):")
    print(f"  running, first caption published   RSS {running:6.0f} MiB   PSS {running_pss:6.0f} MiB   peak (VmHWM) {peak:6.0f} MiB")
    print(f"  after {idle_s:.0f} s idle                    RSS {idle_rss:6.0f} MiB   PSS {idle_pss:6.0f} MiB   CPU {cpu:.1f} % of one core")
    print(f"  generator loaded by one render     RSS {loaded:6.0f} MiB   PSS {loaded_pss:6.0f} MiB   peak (VmHWM) {peak_gen:6.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--scenecast", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--preprocess-dump", required=True, help="scenecast's preprocess_dump example")
    args = ap.parse_args()
    photos = sorted(p for p in (args.cache / "models" / "photos").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DYLIB_PATH", "SCENECAST_CONFIG")}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "peer.toml"
        # The peer has no caption check by the image tokens, so scenecast runs without it too: the
        # same work on both sides, and the same caption text to compare.
        config.write_text(f'[models]\ncache_dir = "{args.cache}"\n[llm]\nthreads = {args.threads}\nground_captions = false\n'
                          f'[onnx]\nintra_threads = {args.threads}\n')
        sides = {
            "scenecast": [args.scenecast, "--config", str(config), "caption", "--json", *map(str, photos)],
            "python": [sys.executable, str(HERE / "caption.py"), "--cache", str(args.cache), "--threads",
                       str(args.threads), "--json", *map(str, photos)],
        }
        results = {side: {"warm": [], "cold": [], "rss": [], "pss": [], "captions": None} for side in sides}
        for _ in range(args.rounds):
            for side, cmd in sides.items():
                lines, cold, rss, peak_pss = run_captions(cmd, env)
                r = results[side]
                r["warm"] += [line["timings_ms"]["total"] for line in lines[1:]]
                r["cold"].append(cold)
                r["rss"].append(rss)
                r["pss"].append(peak_pss)
                r["captions"] = r["captions"] or {Path(line["image"]).name: line["text"] for line in lines}
    med = {side: {k: statistics.median(r[k]) for k in ("warm", "cold", "rss", "pss")} for side, r in results.items()}
    s, p = med["scenecast"], med["python"]
    print(f"caption, {len(photos)} photos x {args.rounds} rounds, {args.threads} threads, same models and prompt (medians):")
    print(f"  {'':10} {'caption (warm)':>15} {'cold start':>12} {'peak RSS':>10} {'peak PSS':>10}")
    for side in sides:
        m = med[side]
        print(f"  {side:10} {m['warm']:12.0f} ms {m['cold']:10.2f} s {m['rss']:7.0f} MiB {m['pss']:6.0f} MiB")
    print(f"  ratio scenecast / python: latency {s['warm'] / p['warm']:.2f} (goal <= 0.8), "
          f"peak RSS {s['rss'] / p['rss']:.2f} (goal <= 0.6), peak PSS {s['pss'] / p['pss']:.2f}, "
          f"cold start {s['cold'] / p['cold']:.2f}")
    same = [n for n in results["scenecast"]["captions"] if results["scenecast"]["captions"][n] == results["python"]["captions"].get(n)]
    print(f"  same caption text: {len(same)} of {len(photos)}")
    for name, text in results["scenecast"]["captions"].items():
        mark = "=" if name in same else "≠"
        print(f"    {mark} {name}: scenecast {text!r}" + ("" if name in same else f" / python {results['python']['captions'].get(name)!r}"))
    differ = [p for p in photos if p.name not in same]
    if differ:
        same_tensors(differ, sides["python"], env, args.preprocess_dump, results["scenecast"]["captions"])
    footprint(args.scenecast, args.cache, photos[0], env, args.idle_s)


def same_tensors(photos: list[Path], peer: list[str], env: dict, dump: str, scenecast_captions: dict) -> None:
    """Captions the photos whose captions differed once more with the peer, this time from the
    tensors scenecast pre-processed (its `preprocess_dump` example): when the peer then writes
    scenecast's caption, everything after pre-processing (ONNX Runtime, llama.cpp, the sampler)
    agrees, and the two parted at decoding or resizing the image."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([dump, tmp, *map(str, photos)], check=True, env=env)
        lines, *_ = run_captions(peer + ["--tensors", tmp], env, only=photos)
    captions = {Path(line["image"]).name: line["text"] for line in lines}
    agree = [p.name for p in photos if captions[p.name] == scenecast_captions[p.name]]
    print(f"  of the {len(photos)} that differ, the peer fed scenecast's pre-processed tensors writes scenecast's "
          f"caption for {len(agree)}")
    for p in photos:
        if p.name not in agree:
            print(f"    ≠ {p.name}: scenecast {scenecast_captions[p.name]!r} / python on its tensors {captions[p.name]!r}")


if __name__ == "__main__":
    main()
