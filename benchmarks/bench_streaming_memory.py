"""Peak memory while streaming N samples from webdataset shards: it should not grow with N.

For each N (default 10,000 and 100,000) the script writes N distinct LLaVA records (each with its own id,
question, answer and meta; each names one of 256 tiny PNGs and one of 64 0.1 s WAVs) as one JSON file,
converts it with ``mmfuse.data.shards.write_shards`` (1000 samples per shard), then, in a fresh process,
streams one epoch through ``ShardStream.epoch`` (shuffle buffer 1000) and decodes every image and audio
clip from its bytes with mmfuse's loaders (``load_image``, ``load_audio``), as the processor does. That
process reports its resident memory (RSS) when the epoch starts and the highest RSS seen while streaming
(read every 250 samples; ``ru_maxrss`` is no use here, as importing torch peaks higher than streaming),
and checks it saw every sample exactly once (the sum of the sample numbers, so the check holds no list).
Holding the samples instead grows with N: keeping all 10,000 streamed samples in a list added 44 MB.

    OMP_NUM_THREADS=1 python benchmarks/bench_streaming_memory.py [--sizes 10000,100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile
from PIL import Image

from mmfuse.data.media import load_audio, load_image
from mmfuse.data.shards import ShardStream, write_shards

IMAGES, CLIPS, RATE = 256, 64, 16000
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_dataset(out: Path, n: int) -> Path:
    """``out/data.json`` with ``n`` records over a pool of small PNG and WAV files."""
    rng = np.random.default_rng(0)
    (out / "images").mkdir(parents=True)
    (out / "audio").mkdir()
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(out / "images" / f"{i}.png")
    for i in range(CLIPS):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 10 * i) * np.arange(RATE // 10) / RATE)
        soundfile.write(str(out / "audio" / f"{i}.wav"), wave.astype(np.float32), RATE)
    records = [{
        "id": f"s{i}", "image": f"images/{i % IMAGES}.png", "audio": f"audio/{i % CLIPS}.wav",
        "conversations": [{"from": "human", "value": f"<image>\n<audio>\nSample {i}: what colour is the shape?"},
                          {"from": "gpt", "value": COLOURS[i % len(COLOURS)]}],
        "meta": {"number": i},
    } for i in range(n)]
    path = out / "data.json"
    path.write_text(json.dumps(records))
    return path


def stream(directory: Path, shuffle_buffer: int) -> dict:
    """One epoch, every media item decoded; runs in a fresh process."""
    shards = ShardStream(directory, shuffle_buffer=shuffle_buffer)
    process = psutil.Process()
    before = peak = process.memory_info().rss
    start = time.perf_counter()
    count = number_sum = 0
    for sample in shards.epoch(seed=0):
        assert load_image(sample.media["image"][0], sample.id).size == (16, 16), sample.id
        assert load_audio(sample.media["audio"][0], RATE, sample.id).size == RATE // 10, sample.id
        count += 1
        number_sum += sample.meta["number"]
        if count % 250 == 0:
            peak = max(peak, process.memory_info().rss)
    seconds = time.perf_counter() - start
    n = len(shards)
    if count != n or number_sum != n * (n - 1) // 2:
        raise SystemExit(f"streamed {count} samples (number sum {number_sum}); expected each of the {n} once")
    return {"samples": count, "seconds": round(seconds, 1), "samples_per_s": round(count / seconds),
            "rss_before_mb": round(before / 2**20, 1), "peak_rss_mb": round(peak / 2**20, 1)}


def measure(n: int, work: Path, shuffle_buffer: int) -> dict:
    start = time.perf_counter()
    source = write_dataset(work / str(n), n)
    index = write_shards(source, work / str(n) / "shards", samples_per_shard=1000)
    write_seconds = time.perf_counter() - start
    shard_bytes = sum((work / str(n) / "shards" / s["name"]).stat().st_size for s in index["shards"])
    child = subprocess.run([sys.executable, __file__, "--stream", str(work / str(n) / "shards"),
                            "--shuffle-buffer", str(shuffle_buffer)], capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"streaming {n} samples failed:\n{child.stderr[-3000:]}")
    return {"n": n, "shards": len(index["shards"]), "shard_mb": round(shard_bytes / 2**20, 1),
            "write_seconds": round(write_seconds, 1), **json.loads(child.stdout.splitlines()[-1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated sample counts")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--stream", type=Path, help=argparse.SUPPRESS)  # the child process: stream this shard directory
    args = ap.parse_args(argv)
    if args.stream:
        print(json.dumps(stream(args.stream, args.shuffle_buffer)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(int(n), Path(tmp), args.shuffle_buffer) for n in args.sizes.split(",")]
    print(f"{'samples':>8} {'shards':>6} {'shard MB':>9} {'write s':>8} {'stream s':>9} {'samples/s':>9} "
          f"{'RSS at start MB':>16} {'peak RSS MB':>12} {'growth MB':>10}")
    for r in rows:
        print(f"{r['n']:>8} {r['shards']:>6} {r['shard_mb']:>9} {r['write_seconds']:>8} {r['seconds']:>9} "
              f"{r['samples_per_s']:>9} {r['rss_before_mb']:>16} {r['peak_rss_mb']:>12} "
              f"{r['peak_rss_mb'] - r['rss_before_mb']:>10.1f}")
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS {rows[-1]['n']} samples / {rows[0]['n']} samples: {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "peak_rss_ratio": round(ratio, 3)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
