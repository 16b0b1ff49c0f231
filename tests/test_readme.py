"""The README's examples work as written: its Python blocks that need no GPU, weights or dataset
run, and every `selagg-fast` command line in it parses with the real argument parser."""
import re
import shlex
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
# blocks that name files a new user does not have (weights, an ImageNet folder) are shown, not run
NEEDS_FILES = re.compile(r"\.pth|\.safetensors|/data/")


def _blocks(language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _command_lines() -> list:
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("selagg-fast") and "..." not in line and "&&" not in line:
                lines.append(line)
    return lines


PYTHON_BLOCKS = [b for b in _blocks("python") if not NEEDS_FILES.search(b)]


def test_readme_has_examples():
    assert PYTHON_BLOCKS and len(_command_lines()) >= 5


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"python{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_block_runs(block):
    torch.manual_seed(0)
    exec(compile(block, str(README), "exec"), {})


@pytest.mark.parametrize("line", _command_lines())
def test_command_line_parses(line):
    from selagg_fast.cli import build_parser

    args = build_parser().parse_args(shlex.split(line)[1:])  # argparse exits (SystemExit) on an unknown flag
    assert callable(args.func)
