"""Options are typed with Literal, so LightningCLI rejects a typo with a usage error listing the choices."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import lightning.pytorch as L
    from lightning.pytorch.cli import LightningCLI

    class M(L.LightningModule):
        pass

    LightningCLI(M, run=False, args=["--trainer.callbacks+=boundguard.integrations.lightning.BoundGuard",
                                     "--trainer.callbacks.on_violation=hlat"])
''')


def test_lightning_cli_typo_is_a_usage_error_with_the_choices(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]  # argparse's usage-error exit status, not a traceback
    assert "Traceback" not in out.stderr
    assert "Literal['log', 'warn', 'halt', 'raise', 'bound']" in out.stderr and "hlat" in out.stderr
