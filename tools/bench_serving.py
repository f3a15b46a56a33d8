"""The serving benchmark (same as `fastgen-compile bench`): SplitFuse vs prefill-first vs
transformers' continuous batching, effective throughput under a chat SLA, latency percentiles, plots.

    .venv/bin/python tools/bench_serving.py [--quick] [--clients 1 2 4 8] [--prompt-mean 1200] [--gen-mean 60]
"""

import sys

from fastgen_compile.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
