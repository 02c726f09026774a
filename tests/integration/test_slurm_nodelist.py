"""Our node-list expansion agrees with Slurm's own ``scontrol show hostnames`` (needs the Slurm client only)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from llmtrain.distributed.slurm import expand_nodelist

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="no Slurm client here")
def test_expand_nodelist_agrees_with_scontrol():
    for nodelist in ("node[01-03,07]", "a1,b[2-3],c", "n[098-101]", "rack[1-2]-n[1,3]"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        assert out.stdout.split() == expand_nodelist(nodelist)
