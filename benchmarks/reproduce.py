"""The reproduction study of issue 7: every strategy, both device settings, several seeds for the
main methods, E2E metrics; writes docs/results/results.json, its plots and the tables of
docs/results.md. See `python benchmarks/reproduce.py --help`.

    python benchmarks/reproduce.py --doc docs/results.md   # the full study (SmolLM2-135M)
    python benchmarks/reproduce.py --quick                 # the CI smoke run (tiny model)
"""

import sys

from study import main  # benchmarks/study.py, beside this script

if __name__ == "__main__":
    sys.exit(main())
