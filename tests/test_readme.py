"""The README's commands and its own-training-loop example stay true."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_install_and_test_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert "pip install" in first_block[0] and first_block[0].rstrip().endswith("crl audit")
    assert first_block[1].strip() == "python -m pytest -q"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci


def _run_example(loader):
    text = README.read_text()
    code = re.search(r"<!-- crl-loop-example.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    scope = {"loader": loader}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_own_training_loop_example_runs_and_moves_the_centers():
    untrained = _run_example([])                     # same seed, no batches: initial state
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
              for _ in range(2)]
    trained = _run_example(loader)
    c0, c1 = untrained["crl_loss"].centers.detach(), trained["crl_loss"].centers.detach()
    assert trained["tap"].in_features == 512 and c1.shape == (10, 512)
    assert not torch.equal(c0, c1)                   # the centers' optimizer stepped
    w0, w1 = untrained["model"].fc.weight.detach(), trained["model"].fc.weight.detach()
    assert not torch.equal(w0, w1)                   # and so did the model's
