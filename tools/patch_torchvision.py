"""Make the package index's torchvision import beside the pinned CPU torch (test set-up only).

The torchvision release built for torch 2.13 on PyPI is a CUDA build: its compiled operators
(``torchvision/_C.so``) link against ``libtorch_cuda.so``, which the CPU torch does not ship,
so they do not load. torchvision handles that for every operator but two:
``_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and ``::qnms``
unconditionally, and ``import torchvision`` fails with
``RuntimeError: operator torchvision::nms does not exist`` (which breaks ``import timm`` and
the Hugging Face classes that probe torchvision as well).

This script guards those two registrations by ``torchvision.extension._has_ops()``, as the
others already are. Models, transforms and functional ops are pure Python and unaffected;
only the detection operators (``nms``, ``roi_align``, ...) stay unavailable, as they were.
Idempotent; does nothing when the compiled operators load or the file is already patched.
Run with the virtual environment's interpreter: ``python tools/patch_torchvision.py``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

MARK = "# bayescurv: guarded for a CPU torch"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed; nothing to patch")
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        print(f"{path} already patched")
        return 0
    pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)\n'
                         r"(def meta_\w+\(.*?\n(?:    .*\n|\n)*)", re.MULTILINE)
    count = 0

    def guard(m: re.Match) -> str:
        nonlocal count
        count += 1
        body = "".join(f"    {line}\n" if line else "\n"
                       for line in (m.group(0).rstrip("\n")).split("\n"))
        return f"if torchvision.extension._has_ops():  {MARK}\n{body}\n"

    new = pattern.sub(guard, text)
    if count != 2:
        print(f"{path}: expected 2 unconditional registrations, found {count}; not patched",
              file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path}: nms/qnms fake registrations guarded by _has_ops()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
