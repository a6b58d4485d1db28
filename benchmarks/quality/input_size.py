"""What the default model's input size costs and gives: the `ris` CLI with new collections at SIZE pixels a side.

Usage: python benchmarks/quality/input_size.py SIZE RIS_ARGS...
  e.g. `... 208 index CALTECH -c c208.ris`, then `... 208 eval -c c208.ris --json` and
  `... 208 eval -c c208.ris --copies 60 --copy-set harsh --seed 1 --json` (a collection's queries must run at the
  size it was built with: pass the same SIZE). At any SIZE but 224 the model is exported and calibrated into the
  cache under its own export version (1000 + SIZE; PyTorch needed), never the shipped file. Figures:
  benchmarks/RESULTS.md, section 2 ("Tried, not adopted").
"""

from __future__ import annotations

import dataclasses
import sys

from ris.model import registry, runtime


def main() -> None:
    size = int(sys.argv.pop(1))
    spec = registry.get_spec(registry.DEFAULT_MODEL)
    registry.MODELS[registry.DEFAULT_MODEL] = dataclasses.replace(spec, input_size=size)
    if size != spec.input_size:
        runtime.EXPORT_VERSION = 1000 + size  # its own cached export; the shipped one is for the default size only
    from ris.cli import main as ris

    sys.exit(ris())


if __name__ == "__main__":
    main()
