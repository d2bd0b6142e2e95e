"""The exported adapter names a base that loads outside fedlora, and the README's offline recipe works."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from fedlora.adapters import is_lora_b
from fedlora.export import PACKAGED_HUB_IDS, portable_base_name, save_peft_adapter
from fedlora.models import adapter_state, get_lora_model, init_adapter_state, load_adapter_state

README = Path(__file__).resolve().parent.parent / "README.md"
SENTENCE = "the robot pushes the cat"


def _readme_recipe() -> str:
    """Return the Python code of the README's offline loading line (the block after the marker)."""
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- offline-load", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    code = re.fullmatch(r'python -c "(.*)"', block.strip())
    assert code, f"README offline-load block is not one `python -c` line: {block!r}"
    return code.group(1)


def test_portable_base_name():
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_base_name("minilm") == PACKAGED_HUB_IDS["minilm"] == hub_id
    assert portable_base_name("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"
    assert portable_base_name(".") == str(Path(".").resolve())


def test_exported_adapter_names_the_hub_base_and_the_readme_line_loads_it_offline(tmp_path):
    loaded = get_lora_model("minilm", "classification", 4, 2, 4.0, 0.0, ("query", "value"))
    gen = torch.Generator().manual_seed(0)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if is_lora_b(k) else v
        for k, v in init_adapter_state(adapter_state(loaded, 2), 1).items()
    }
    load_adapter_state(loaded, 2, state)
    model = loaded.peft.eval()
    batch = loaded.tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).logits[0].tolist()
    out = save_peft_adapter(
        tmp_path / "runs" / "wd" / "adapter",
        state,
        base_model="minilm",
        task="classification",
        alpha=4.0,
        target_modules=loaded.target_modules,
        head_modules=loaded.head_modules,
        meta={"labels": ["a", "b", "c", "d"]},
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"

    # The README line, verbatim, run from a directory holding runs/wd/adapter, with the hub unreachable.
    check = (
        "; import json, transformers; t = transformers.AutoTokenizer.from_pretrained(m.get_model_path())"
        f"; b = t({SENTENCE!r}, return_tensors='pt'); model.eval()"
        "; print(json.dumps(model(**b).logits[0].tolist()))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    proc = subprocess.run(
        [sys.executable, "-c", _readme_recipe() + check],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert "loaded" in lines[0]
    theirs = json.loads(lines[-1])
    assert torch.allclose(torch.tensor(theirs), torch.tensor(ours), atol=1e-5), (theirs, ours)
