"""BoundGuardCallback under the Trainer's DDP launch: 2 CPU processes (gloo), started as torchrun starts
them, with a deadline; NaN labels on one rank only."""
from __future__ import annotations

import json
import textwrap

import pytest

from helpers import RANK_EXIT

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = textwrap.dedent('''
    import faulthandler, json, os, sys, warnings
    faulthandler.dump_traceback_later(150, exit=True)  # a hang dumps every thread's stack and exits
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers import default_data_collator
    from boundguard.integrations.transformers import BoundGuardCallback

    transformers.utils.logging.set_verbosity_error()
    out, rank = sys.argv[1], int(os.environ["RANK"])

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.ids, self.y = torch.randint(0, 100, (64, 12), generator=g), torch.rand(64, generator=g)
        def __len__(self):
            return 64
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.y[i]}

    calls = 0
    def collate(features):  # NaN labels in rank 1's second batch only
        global calls
        calls += 1
        batch = default_data_collator(features)
        if rank == 1 and calls == 2:
            batch["labels"][0] = float("nan")
        return batch

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=1, problem_type="regression"))
    guard = BoundGuardCallback(bounds=None, on_violation="halt", check_every_n_steps=3,
                               alerts_path=os.path.join(out, "alerts.jsonl"))
    args = TrainingArguments(output_dir=out, max_steps=10, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, ddp_backend="gloo", save_strategy="no", disable_tqdm=True,
                             logging_steps=1, seed=0, ddp_timeout=60)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), data_collator=collate, callbacks=[guard])
    trainer.train()
    snap = guard._engine.last_snapshot
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": args.world_size, "step": trainer.state.global_step,
                   "codes": sorted({a.code for a in guard.alerts}),
                   "nan_step": next((a.step for a in guard.alerts if a.code == "nonfinite_input"), None),
                   "target_n": snap.counts["target"] if snap else None,
                   "logged": sorted(h["step"] for h in trainer.state.log_history if "boundguard/alerts" in h)}, f)
''') + RANK_EXIT


def test_trainer_ddp_ranks_stop_together(tmp_path, two_ranks):
    script = tmp_path / "hf_ddp.py"
    script.write_text(SCRIPT)
    two_ranks(script, tmp_path, timeout=200)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # rank 1's NaN of step 2 is seen by both ranks at the check of step 3, where both stop
    assert r0["step"] == r1["step"] == r0["nan_step"] == r1["nan_step"] == 3, (r0, r1)
    assert "nonfinite_input" in r0["codes"] and r0["codes"] == r1["codes"]
    assert r0["target_n"] == r1["target_n"] == 2 * 4 * 2  # one check's targets: 2 steps x batch 4 x 2 ranks
    assert r0["logged"] == r1["logged"] == [1, 3]
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x.get("code") == "nonfinite_input" and x.get("event") == "new") == 1
