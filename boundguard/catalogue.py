"""The alert catalogue: one entry per stable code, with what it means and what to change; and the README's
table of it (``python -m boundguard.catalogue`` prints it, ``--write-readme README.md`` updates it)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from boundguard.fmt import md_cell

__all__ = ["Entry", "CATALOGUE", "CODES", "RANGE_CODES", "catalogue_markdown", "replace_catalogue", "CATALOGUE_START",
           "CATALOGUE_END", "SOFTCAP_CODES", "BOUND_CODES", "entry"]


@dataclass(frozen=True)
class Entry:
    code: str
    severity: str
    title: str
    meaning: str
    fix: str
    why: str
    lightning: str
    keras: str


_ENTRIES = [
    Entry(
        "output_out_of_range", "error", "Predictions outside the bounds",
        "Predictions fall outside the range the targets live in (error; warning when the bounds were inferred).",
        "Put a bounding activation on the output layer (sigmoid for (0, 1), tanh for (-1, 1), "
        "lo + (hi - lo) * sigmoid(z) for (lo, hi), softmax for a distribution), or let boundguard insert it "
        "with on_violation='bound'.",
        "Out-of-range probabilities break thresholds, calibration and any loss that takes a log of them.",
        "self.head = nn.Sequential(nn.Linear(h, 1), nn.Sigmoid())",
        "keras.layers.Dense(1, activation='sigmoid')",
    ),
    Entry(
        "missing_output_activation", "warning", "Raw head output used as a bounded prediction",
        "The targets or declared bounds are bounded, but the prediction is the raw output of a linear layer.",
        "Add the output activation that matches the bounds (sigmoid for (0, 1), tanh for (-1, 1), softmax "
        "for class probabilities), or keep the raw output and switch to the logits loss "
        "(BCEWithLogitsLoss, CrossEntropyLoss, from_logits=True).",
        "Nothing stops a linear head from leaving the range: it will, as soon as inputs drift.",
        "return torch.sigmoid(self.fc(h))  # or nn.BCEWithLogitsLoss() on the raw output",
        "keras.layers.Dense(1, activation='sigmoid')",
    ),
    Entry(
        "activation_loss_mismatch", "error", "Activation and loss disagree",
        "An activation is applied before a loss that applies its own (softmax before CrossEntropyLoss, "
        "sigmoid before BCEWithLogitsLoss, from_logits=True after sigmoid/softmax), or a loss that expects "
        "probabilities receives unbounded values.",
        "Apply the activation once: drop the softmax/sigmoid from the model and keep the logits loss "
        "(CrossEntropyLoss, BCEWithLogitsLoss, from_logits=True), applying the activation only at inference; "
        "or keep the activation and use the probability loss (NLLLoss on log_softmax, BCELoss, from_logits=False).",
        "A double softmax squashes gradients and slows or stalls learning; a probability loss on raw values "
        "is silently clipped or fails.",
        "self.fc = nn.Linear(h, classes)  # no nn.Softmax; criterion = nn.CrossEntropyLoss()",
        "Dense(classes)  # linear; loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)",
    ),
    Entry(
        "target_out_of_range", "error", "Targets the output can never reach",
        "Targets lie outside the range the output activation or the declared bounds allow "
        "(a sigmoid head with targets up to 10).",
        "Scale the targets into the output's range (e.g. min-max scale to [0, 1]) or widen the output "
        "activation to the targets' range (lo + (hi - lo) * sigmoid(z)), or fix the declared bounds.",
        "The model is pushed towards values it cannot produce: the output pins at the bound and gradients vanish.",
        "y = (y - y_min) / (y_max - y_min)  # targets into [0, 1]",
        "y = (y - y.min()) / (y.max() - y.min())",
    ),
    Entry(
        "output_saturated", "warning", "Predictions pinned at a bound",
        "A large share of predictions sits exactly at a bound (clipping) or deep in the flat tail of "
        "sigmoid/tanh, where gradients vanish.",
        "Replace hard clipping with a smooth bound (sigmoid/tanh scaled to the range), check the targets' "
        "range, and scale inputs or lower the learning rate so pre-activations stay moderate.",
        "Pinned outputs get zero (clip) or tiny (saturated tail) gradients: that part of the model stops learning.",
        "return lo + (hi - lo) * torch.sigmoid(self.fc(h))  # instead of torch.clamp",
        "Dense(1, activation='tanh')  # instead of tf.clip_by_value",
    ),
    Entry(
        "preactivation_exploding", "warning", "Pre-activations are huge or growing",
        "The output layer's pre-activation magnitudes are very large, grow check after check, or approach "
        "float16's overflow at 65504.",
        "Lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0), optimizer clipnorm=1.0), "
        "scale the inputs, or add normalisation before the head.",
        "Huge pre-activations saturate any bounding activation and precede overflow to Inf/NaN.",
        "Trainer(gradient_clip_val=1.0)",
        "keras.optimizers.Adam(1e-3, clipnorm=1.0)",
    ),
    Entry(
        "logits_growing", "warning", "Logits running away",
        "The logits a softmax cross-entropy reads (a classifier's or a language model's head) grow check "
        "after check: their largest magnitude far above its early level and their mean logsumexp, what "
        "z-loss penalises, tens of nats above its own.",
        "Lower the learning rate or clip gradients; add a z-loss term (1e-4 * logsumexp(logits)**2); or "
        "soft-cap the logits, cap * tanh(z / cap) (Gemma 2 uses 30): on_violation='bound' (or "
        "actions={'logits_growing': 'bound'}) inserts it, with the cap taken from the run's early logits.",
        "Runaway logits make the softmax one-hot, its gradients vanish or spike, and the loss diverges "
        "or turns NaN a few hundred steps later.",
        "BoundGuard(actions={'logits_growing': 'bound'})",
        "BoundGuard(actions={'logits_growing': 'bound'})",
    ),
    Entry(
        "regression_loss_on_probabilities", "info", "Regression loss on probabilities",
        "A regression loss (MSE, MAE) is used on probability outputs with binary or class targets.",
        "Use the matching likelihood: BCEWithLogitsLoss (or BCELoss after sigmoid) for binary targets, "
        "CrossEntropyLoss for classes; in Keras binary_crossentropy / categorical_crossentropy.",
        "MSE on a sigmoid output has vanishing gradients for confident wrong answers and trains slowly.",
        "criterion = nn.BCEWithLogitsLoss()  # on the raw output",
        "model.compile(loss='binary_crossentropy')",
    ),
    Entry(
        "inputs_not_scaled", "warning", "Inputs far from unit scale",
        "Input features are far from unit scale (root mean square far above 1 or far below it).",
        "Standardise the inputs (subtract the training mean, divide by the standard deviation) or "
        "min-max scale them before they reach the model.",
        "Unscaled inputs drive large pre-activations that push outputs out of range or into saturation.",
        "x = (x - mean) / std  # statistics from the training split",
        "keras.layers.Normalization()  # adapt() on the training data, as the first layer",
    ),
    Entry(
        "nonfinite_input", "critical", "NaN/Inf in the inputs",
        "The inputs (or the targets) of a batch contain NaN or Inf.",
        "Clean the data: find the rows with NaN/Inf (np.isfinite), impute or drop them, and check "
        "divisions and logs in the preprocessing.",
        "One NaN input poisons the weights it touches at the next update.",
        "assert torch.isfinite(x).all()  # in the Dataset, to find the rows",
        "x = np.nan_to_num(x)  # or drop the rows",
    ),
    Entry(
        "nonfinite_output", "critical", "NaN/Inf in the predictions",
        "The predictions or the output layer's pre-activations contain NaN or Inf.",
        "Lower the learning rate, clip gradients, check the inputs for NaN/Inf, and in fp16 use "
        "bf16 or loss scaling (fp16 overflows above 65504).",
        "Non-finite predictions mean the weights are already (or about to be) NaN.",
        "Trainer(gradient_clip_val=1.0, precision='bf16-mixed')",
        "keras.optimizers.Adam(1e-4, clipnorm=1.0)",
    ),
    Entry(
        "nonfinite_loss", "critical", "NaN/Inf loss",
        "The training loss is NaN or Inf.",
        "Lower the learning rate, clip gradients, check inputs and targets for NaN/Inf, and use a "
        "numerically stable loss (logits losses instead of log of a sigmoid).",
        "Backpropagating a NaN loss writes NaN into every weight.",
        "Trainer(gradient_clip_val=1.0); criterion = nn.BCEWithLogitsLoss()",
        "keras.optimizers.Adam(1e-4, clipnorm=1.0)",
    ),
    Entry(
        "loss_diverging", "error", "Loss diverging",
        "The loss level (the median of the last 20 steps) rose far above the best level it had reached: "
        "by half the loss's own scale (its initial level, or how far it had come down) and by several "
        "times the run's step-to-step noise, and, for a positive loss, 10x.",
        "Lower the learning rate (a factor 3 to 10), add warm-up or gradient clipping, and check for "
        "corrupted batches near the step the rise began.",
        "A diverging run rarely recovers; continuing wastes compute.",
        "torch.optim.Adam(model.parameters(), lr=1e-4); Trainer(gradient_clip_val=1.0)",
        "keras.optimizers.Adam(1e-4, clipnorm=1.0)",
    ),
    Entry(
        "loss_spike", "warning", "Loss spike",
        "A single step's loss was far above its running level: beyond the recent steps' spread (in "
        "log terms too, for a positive loss: a wobble of a loss near zero is not a spike), a real share "
        "of the loss's scale, and several times the largest jumps the run had shown before.",
        "Look at the batch of that step (outliers, bad labels), add gradient clipping, or lower the "
        "learning rate.",
        "Spikes precede divergence and point at bad data.",
        "Trainer(gradient_clip_val=1.0)",
        "keras.optimizers.Adam(1e-3, clipnorm=1.0)",
    ),
    Entry(
        "loss_plateau", "info", "Loss plateau",
        "The loss stopped improving.",
        "If it plateaued early, raise the learning rate or check the output activation and loss pairing; "
        "if late, stop (EarlyStopping) or decay the learning rate.",
        "Training past a plateau costs compute without gain.",
        "callbacks=[EarlyStopping('val_loss'), LearningRateMonitor()]",
        "callbacks=[keras.callbacks.ReduceLROnPlateau()]",
    ),
    Entry(
        "loss_at_baseline", "warning", "Loss no better than a constant prediction",
        "The loss is still at 80% or more of what predicting a constant scores on the run's targets (MSE: "
        "their variance; binary cross-entropy: the entropy of the positive rate; multi-class "
        "cross-entropy: log K), never went below 60% of it, and no longer falls over the last half of the "
        "run: the model predicts the average and learns nothing beyond it. Judged after 300 steps when the "
        "loss came down onto that level, after 1000 when it started there (a slow start).",
        "Lower the learning rate (a factor 10: a rate too large settles the output at the mean), check "
        "that inputs and targets line up (shuffled separately?) and that the prediction and target shapes "
        "match ((B, 1) against (B,) broadcasts MSE to every pair), and scale the inputs.",
        "A run stuck at the constant baseline trains for nothing while its loss looks finite and calm.",
        "torch.optim.Adam(model.parameters(), lr=1e-3); loss = F.mse_loss(pred.squeeze(-1), y)",
        "keras.optimizers.Adam(1e-3)",
    ),
    Entry(
        "nonfinite_gradient", "critical", "NaN/Inf gradients",
        "The gradients of the output layer were NaN or Inf while the forward pass and the loss were finite "
        "(with an fp16 GradScaler: at every step of the interval).",
        "Look for an operation with an infinite derivative at a finite value (sqrt or log at 0, pow with a "
        "fractional exponent, division by a value that can be 0), add an epsilon there, and clip gradients.",
        "The optimiser writes NaN into the weights at the next step; from then on every output is NaN.",
        "torch.sqrt(x + 1e-12); Trainer(gradient_clip_val=1.0)",
        "keras.optimizers.Adam(1e-3, clipnorm=1.0)",
    ),
    Entry(
        "gradient_exploding", "error", "Head gradients exploding",
        "The largest gradient norm of the output layer in a check interval is far above (100x by default) "
        "its own scale at the start of the run.",
        "Clip gradients (by norm), lower the learning rate, and look for batches with outliers near the "
        "step it began; a loss spike or divergence usually follows.",
        "Exploding gradients throw the weights far in one step; the loss rarely recovers.",
        "Trainer(gradient_clip_val=1.0, gradient_clip_algorithm='norm')",
        "keras.optimizers.Adam(1e-3, clipnorm=1.0)",
    ),
    Entry(
        "gradient_vanishing", "warning", "No gradient reaches the head",
        "The gradients of the output layer are zero (or 1e-4 of their own scale) while the loss is still at "
        "half of its initial level or more: the output is saturated, clipped or detached, not converged.",
        "Check the output activation for saturation (a sigmoid/tanh fed huge pre-activations, a clamp, "
        "a ReLU on the output) and that the loss is computed from the model's output without .detach(); "
        "scale the inputs, lower the learning rate, or use the logits form of the loss.",
        "A head that receives no gradient stops learning while the run keeps spending compute.",
        "loss = F.binary_cross_entropy_with_logits(self.fc(h), y)  # no sigmoid, no clamp before the loss",
        "keras.layers.Dense(1); loss=keras.losses.BinaryCrossentropy(from_logits=True)",
    ),
    Entry(
        "probe_incomplete", "info", "Part of the model could not be watched",
        "boundguard could not locate a tensor it watches (the prediction, its pre-activation, the loss, "
        "the targets or the inputs), so the checks that need it are off for this run.",
        "Name what it could not find: input_key= / target_key= for the batch layout, or call the loss "
        "as a module or torch.nn.functional function on the model's output.",
        "A monitor that silently watches nothing is worse than none: this says what is not covered.",
        "BoundGuard(target_key='label', input_key='features')",
        "BoundGuard()  # Keras: make the output a Dense/Activation layer",
    ),
]

CATALOGUE: dict[str, Entry] = {e.code: e for e in _ENTRIES}
CODES: tuple[str, ...] = tuple(CATALOGUE)
#: The range codes: the ``bound`` action answers them with the bounding activation of the bounds.
RANGE_CODES = frozenset({"output_out_of_range", "missing_output_activation"})
#: Codes the ``bound`` action answers with a soft cap ``cap * tanh(z / cap)`` on the logits.
SOFTCAP_CODES = frozenset({"logits_growing"})
#: Codes the ``bound`` action answers by inserting a bounding activation (the others: ``warn``).
BOUND_CODES = RANGE_CODES | SOFTCAP_CODES


def entry(code: str) -> Entry:
    """The catalogue entry of ``code``; a clear error lists the valid codes."""
    try:
        return CATALOGUE[code]
    except KeyError:
        raise KeyError(f"unknown alert code {code!r}; valid codes: {', '.join(CODES)}") from None


# ---------------------------------------------------------------------------------------- the README's table
CATALOGUE_START = "<!-- catalogue:start -->"
CATALOGUE_END = "<!-- catalogue:end -->"


def catalogue_markdown() -> str:
    """The README's alert catalogue table, generated from :data:`CATALOGUE`.

    >>> catalogue_markdown().splitlines()[0]
    '| code | default severity | fires when | fix |'
    """
    rows = ["| code | default severity | fires when | fix |", "| --- | --- | --- | --- |"]
    for code in CODES:
        e = CATALOGUE[code]
        rows.append(f"| `{e.code}` | {e.severity} | {md_cell(e.meaning)} | {md_cell(e.fix)} |")
    return "\n".join(rows) + "\n"


def replace_catalogue(text: str) -> str:
    """``text`` with the table between the catalogue markers replaced by :func:`catalogue_markdown`.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = text.find(CATALOGUE_START), text.find(CATALOGUE_END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {CATALOGUE_START} and {CATALOGUE_END} were not found (in that order)")
    return text[: start + len(CATALOGUE_START)] + "\n" + catalogue_markdown() + text[end:]


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m boundguard.catalogue") -> int:
    """Print the README's catalogue table, or (``--write-readme README.md``) replace it between the markers."""
    parser = argparse.ArgumentParser(prog=prog, description="Print or update the README's alert catalogue table.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--catalogue", action="store_true", help="print the catalogue table (Markdown; the default)")
    group.add_argument("--write-readme", metavar="README", help="replace the table between the catalogue markers")
    args = parser.parse_args(argv)
    if args.write_readme is None:
        sys.stdout.write(catalogue_markdown())
        return 0
    path = Path(args.write_readme)
    try:
        text = path.read_text(encoding="utf-8")
        new = replace_catalogue(text)
    except (OSError, ValueError) as err:
        print(f"error: {path}: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
        return 2
    if new != text:
        path.write_text(new, encoding="utf-8")
    print(f"{path}: catalogue table {'updated' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
