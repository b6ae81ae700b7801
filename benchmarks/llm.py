"""Peak memory and step time of language-model heads with and without boundguard, on CPU (on a GPU with --device cuda).

    python -m benchmarks.llm                      # every arm, about 7 minutes on 2 cores
    python -m benchmarks.llm --shapes gpt2 --dtypes bf16 --seqs 256 --steps 4
    python -m benchmarks.llm --smoke              # seconds: a tiny vocabulary, for CI (writes nothing)
    python -m benchmarks.llm --device cuda --batch 8 --seqs 2048   # logits of GBs (not yet run on a GPU)

Causal LMs built from configs (nothing downloaded): GPT-2-shaped (vocab 50257) and Llama-shaped (vocab
128256), both 2 layers of width 64, batch 4, at two sequence lengths (256 and 512 tokens: the logits
double, so an extra that grows with them shows), in a plain loop (``watch(model)`` with its defaults) and
in the Hugging Face ``Trainer`` (``BoundGuardCallback()``), fp32 and bf16 autocast. Each arm runs in its
own process, so its peak resident memory (``ru_maxrss``) is its own; the two arms of one configuration run
one after the other, side by side. Reported: the peak with and without boundguard, the difference in MB
and as a share of the logits' size (B x T x V elements in the logits' dtype), and the median step time
after a warm-up step.

Both arms run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so a freed large
tensor goes back to the system at once and the peak is the peak of live memory. With glibc's default
(a dynamic threshold), where a large block lands depends on the order of earlier frees: three identical
runs of one arm pair differed by 12, 14 and 27 MB (2026-12-07), more than what is measured here.

The last stdout line is ``result: <json>``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {"gpt2": 50257, "llama": 128256}
ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
shape, dtype, arm, steps, batch, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
loop, vocab, device = sys.argv[8], int(sys.argv[9]), sys.argv[10]
cuda = device == "cuda"


def peak_mb():  # on a GPU the caching allocator's peak of tensor memory, on the CPU the process's peak RSS
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


import transformers
transformers.utils.logging.set_verbosity_error()
if shape == "gpt2":
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_layer=2, n_embd=64, n_head=2, n_positions=seq))
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=seq))
model.to(device)
if loop == "hf":  # the Hugging Face Trainer, with BoundGuardCallback() in the watched arm
    import tempfile
    from transformers import Trainer, TrainerCallback, TrainingArguments
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, vocab, (steps * batch, seq), generator=g)]
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    callbacks = [Clock()]
    if arm == "watch":
        from boundguard.integrations.transformers import BoundGuardCallback
        callbacks.append(BoundGuardCallback(alerts_path=sys.argv[7], on_violation="log"))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=1e-3, optim="sgd", bf16=dtype == "bf16", use_cpu=not cuda, report_to=[],
                             save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
    codes = sorted({a.code for a in callbacks[-1].alerts if a.severity != "info"}) if arm == "watch" else []
    print("child: " + json.dumps({"peak_mb": peak_mb(), "step_s": times, "codes": codes}))
    sys.exit(0)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
guard = None
if arm == "watch":
    from boundguard.integrations.torch import watch
    guard = watch(model, alerts_path=sys.argv[7], on_violation="log")
g = torch.Generator().manual_seed(0)
times = []
for step in range(steps):
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    if guard is not None:
        guard.step(loss=out.loss, inputs=None, targets=None)
    opt.zero_grad()
    del out
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
if guard is not None:
    guard.close()
    codes = sorted({a.code for a in guard.alerts if a.severity != "info"})
else:
    codes = []
print("child: " + json.dumps({"peak_mb": peak_mb(), "step_s": times, "codes": codes}))
'''


def run_arm(shape: str, dtype: str, arm: str, steps: int, batch: int, seq: int, out: Path, loop: str,
            vocab: int, device: str = "cpu") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", CHILD, shape, dtype, arm, str(steps), str(batch), str(seq),
                           str(out / f"{shape}-{dtype}-{loop}-{seq}-alerts.jsonl"), loop, str(vocab), device],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{shape}/{dtype}/{arm} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("child: ")][-1]
    return json.loads(line[len("child: "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="gpt2,llama")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqs", default="256,512", help="sequence lengths, each a configuration of its own")
    p.add_argument("--loops", default="plain,hf", help="plain: watch(model) in a plain loop; hf: the HF Trainer")
    p.add_argument("--out", default="/tmp/boundguard-llm")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: peak of torch.cuda.max_memory_allocated (not yet run on a GPU)")
    p.add_argument("--smoke", action="store_true", help="a vocabulary of 512, 16 tokens, 2 steps, GPT-2 bf16 only")
    a = p.parse_args(argv)
    if a.smoke:
        a.shapes, a.dtypes, a.seqs, a.steps = "gpt2", "bf16", "16", 2
    with tempfile.TemporaryDirectory() as tmp:
        return _run(a, Path(tmp) if a.smoke else Path(a.out))


def _run(a: argparse.Namespace, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| loop | shape | logits | tokens | logits size | peak without | peak with | extra | extra, in logits "
          "| step time ratio | alerts |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for loop in a.loops.split(","):
        for shape in a.shapes.split(","):
            vocab = 512 if a.smoke else SHAPES[shape]
            for dtype in a.dtypes.split(","):
                for seq in (int(x) for x in a.seqs.split(",")):
                    off = run_arm(shape, dtype, "off", a.steps, a.batch, seq, out, loop, vocab, a.device)
                    on = run_arm(shape, dtype, "watch", a.steps, a.batch, seq, out, loop, vocab, a.device)
                    logits_mb = a.batch * seq * vocab * (2 if dtype == "bf16" else 4) / 2**20
                    extra_mb = on["peak_mb"] - off["peak_mb"]
                    t_off, t_on = statistics.median(off["step_s"][1:]), statistics.median(on["step_s"][1:])
                    row = {"loop": loop, "shape": shape, "dtype": dtype, "seq": seq, "logits_mb": logits_mb,
                           "peak_off_mb": off["peak_mb"], "peak_on_mb": on["peak_mb"], "extra_mb": extra_mb,
                           "extra_in_logits": extra_mb / logits_mb, "step_ratio": t_on / t_off, "codes": on["codes"]}
                    rows.append(row)
                    print(f"| {loop} | {shape} (V={vocab}) | {dtype} | {a.batch} x {seq} | {logits_mb:.0f} MB | "
                          f"{off['peak_mb']:.0f} MB | {on['peak_mb']:.0f} MB | {extra_mb:.1f} MB | "
                          f"{extra_mb / logits_mb:.3f} | {t_on / t_off:.2f} | {', '.join(on['codes']) or '–'} |",
                          flush=True)
    print("result: " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
