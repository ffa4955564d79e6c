"""The `prune` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from transformers.utils import logging as transformers_logging

from calibration.corpora import CorpusError
from methods import METHODS, PruningError, owl
from methods.magma import GRANULARITIES
from prune.models import EMBEDDED_MODELS, SMOLLM2, ModelError, load_model
from prune.output import OutputError, check_output_dir, save_pruned
from prune.pipeline import ALLOCATIONS, HESSIAN_DTYPES, PROPAGATE_CHOICES, PruneSettings, run_pipeline
from prune.plots import plot_allocation, plot_recover, plot_refine
from prune.recover import RECOVER_OPTIMIZERS, RecoverSettings
from prune.refine import REFINE_ESTIMATORS, REFINE_METHODS, UNDER_MASK, RefineSettings

USER_ERRORS = (PruningError, CorpusError, ModelError, OutputError)

METHOD_HELP = "; ".join(f"{name}: {method.summary}" for name, method in METHODS.items())
MODEL_HELP = "; ".join(f"{name}: {what}" for name, what in EMBEDDED_MODELS.items())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100})
@click.option("--model", default=SMOLLM2, help=f"An embedded model, a local folder, or a hub name. Embedded: {MODEL_HELP}.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="sparsegpt", help=METHOD_HELP)
@click.option("--sparsity", type=click.FloatRange(0.0, 1.0, max_open=True), default=None, help="Fraction of zeros per layer.")
@click.option("--pattern", default=None, metavar="N:M", help="Keep N of every M consecutive input weights of a row (2:4, 4:8).")
@click.option("--calibration", default="wiki-sample", help="wiki-sample (Wikipedia text inside gensim), wikitext2, c4, a text file/folder, or conll:DIR (sentences of a CoNLL train file, for a token classifier; entity F1 on DIR's test file before and after).")
@click.option("--nsamples", type=int, default=128, help="Calibration windows (or sentences, with conll:DIR).")
@click.option("--seqlen", type=int, default=512, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, help="Seed for the choice of calibration windows.")
@click.option("--batch-size", type=int, default=4, help="Calibration windows per forward pass.")
@click.option("--device", default="auto", help="auto (CUDA when available), cpu or cuda; the model stays where it is, blocks run here.")
@click.option("--blocksize", type=int, default=None, help="SparseGPT lazy-update block (default 128).")
@click.option("--mask-blocksize", type=int, default=None, help="SparseGPT adaptive-mask block (default 64).")
@click.option("--percdamp", type=float, default=None, help="SparseGPT/OBS damping, a fraction of mean(diag H) (default 0.01).")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default="uniform", help="Spread the sparsity uniformly, or by OWL outlier ratios (unstructured targets only).")
@click.option("--owl-rule", type=click.Choice(owl.RULES), default=owl.LAMBDA_RULE, help="lambda: the OWL paper (ratios scaled to [0, 2λ], clipped to S ± λ); seed: sparsity ∝ 1 − D.")
@click.option("--owl-m", type=float, default=5.0, help="OWL outlier threshold M: a score is an outlier above M x the block's mean.")
@click.option("--owl-lambda", type=float, default=0.08, help="OWL λ: block sparsities stay within [S − λ, S + λ] (lambda rule).")
@click.option("--propagate", type=click.Choice(PROPAGATE_CHOICES), default="pruned", help="Feed the next block the pruned block's outputs, or the dense block's.")
@click.option("--hessian-dtype", type=click.Choice(sorted(HESSIAN_DTYPES)), default="float32", help="Precision of the Hessian accumulation.")
@click.option("--blocks", default=None, metavar="0-9,12", help="Prune only these transformer blocks (the others stay dense). Default: all.")
@click.option("--skip-incompatible", is_flag=True, help="Leave dense the layers whose input size is not a multiple of M, instead of refusing.")
@click.option("--eval-data", default="wiki-sample", help="Perplexity text: wiki-sample (held-out part), wikitext2, c4, or a text file/folder.")
@click.option("--no-eval", is_flag=True, help="Skip the perplexity evaluation.")
@click.option("--eval-seqlen", type=int, default=None, help="Tokens per evaluation window (default: --seqlen).")
@click.option("--eval-windows", type=int, default=None, help="Evaluate at most this many windows (default: all).")
@click.option("--refine", type=click.Choice(REFINE_METHODS), default=None,
              help="After pruning to N:M, learn better masks of the pruned layers by MaskPro policy gradient (forward passes only).")
@click.option("--refine-steps", type=int, default=100, help="MaskPro steps (one mask draw and one forward pass each).")
@click.option("--refine-lr", type=float, default=50.0, help="MaskPro learning rate of the logits (paper: 50).")
@click.option("--refine-logit-scale", type=float, default=10.0, help="C in π₀ = C · m₀ (paper: 10).")
@click.option("--refine-alpha", type=float, default=0.99, help="Moving-average factor of the loss-residual tracker (paper: 0.99).")
@click.option("--refine-batch", type=int, default=4, help="Calibration windows per MaskPro step.")
@click.option("--refine-seqlen", type=int, default=256, help="Tokens per MaskPro window.")
@click.option("--refine-windows", type=int, default=64, help="Training windows (fixed batches; L(m₀) is measured once per batch).")
@click.option("--refine-holdout", type=int, default=8, help="Held-out windows on which the final mask is compared with the one-shot mask.")
@click.option("--refine-candidates", type=int, default=0, help="Also draw K masks from the learned policy and keep the best of them, the top-N mask and the one-shot mask on the held-out windows.")
@click.option("--refine-weights", type=click.Choice(UNDER_MASK), default="oneshot",
              help="Weights under the mask: the one-shot weights where the one-shot mask kept one, dense elsewhere (oneshot), or the dense originals (dense, the paper's).")
@click.option("--refine-estimator", type=click.Choice(REFINE_ESTIMATORS), default="auto",
              help="∇log p of the unordered kept set (set, the paper's, N <= 4), of the sampled draw order (sequence, any N, more variance), or auto: set when N <= 4.")
@click.option("--recover", type=click.Choice(RECOVER_OPTIMIZERS), default=None,
              help="After pruning, fine-tune the surviving attention/MLP weights on the calibration text (pruned weights stay zero): "
                   "magma (AdamW under Magma), adamw (plain baseline) or skipupdate.")
@click.option("--recover-steps", type=int, default=100, help="Recovery optimizer steps.")
@click.option("--recover-lr", type=float, default=5e-5, help="Peak recovery learning rate (10 % warm-up, cosine decay to 10 %).")
@click.option("--recover-batch", type=int, default=4, help="Recovery windows per step.")
@click.option("--recover-seqlen", type=int, default=256, help="Tokens per recovery window.")
@click.option("--recover-p", type=float, default=0.5, help="Magma/SkipUpdate: probability that a block is updated.")
@click.option("--recover-tau", type=float, default=2.0, help="Magma: temperature of the momentum alignment.")
@click.option("--recover-granularity", type=click.Choice(GRANULARITIES), default="tensor", help="Magma/SkipUpdate: what one masked block is.")
@click.option("--recover-train-other", is_flag=True, help="Also train norms, embeddings and heads (plain AdamW); default: frozen.")
@click.option("--recover-debug", is_flag=True, help="Check after every recovery step that no pruned weight moved.")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Save the pruned model, tokenizer and report.json here.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Where converted embedded models are kept (default ~/.cache/obs-prune).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(**options) -> None:
    """Prune a transformer one-shot, layer by layer, and report what it cost.

    Every Linear/Conv1D inside the transformer blocks is pruned; embeddings, the LM head and
    classifier heads stay dense.
    """
    if options["quiet"]:
        transformers_logging.disable_progress_bar()
    if options["output"] is not None:
        check_output_dir(options["output"], options["overwrite"])
    method_options = {
        name: options[name] for name in ("blocksize", "mask_blocksize", "percdamp") if options[name] is not None
    }
    unsupported = sorted(set(method_options) - set(METHODS[options["method"]].options))
    if unsupported:
        flags = ", ".join("--" + name.replace("_", "-") for name in unsupported)
        raise PruningError(f"{flags} does not apply to method {options['method']}")
    settings = PruneSettings(
        method=options["method"],
        sparsity=options["sparsity"],
        pattern=options["pattern"],
        calibration=options["calibration"],
        nsamples=options["nsamples"],
        seqlen=options["seqlen"],
        seed=options["seed"],
        batch_size=options["batch_size"],
        device=options["device"],
        method_options=method_options,
        allocation=options["allocation"],
        owl_rule=options["owl_rule"],
        owl_m=options["owl_m"],
        owl_lambda=options["owl_lambda"],
        propagate=options["propagate"],
        hessian_dtype=options["hessian_dtype"],
        blocks=options["blocks"],
        skip_incompatible=options["skip_incompatible"],
        eval_data=None if options["no_eval"] else options["eval_data"],
        eval_seqlen=options["eval_seqlen"],
        eval_windows=options["eval_windows"],
        refine=None if options["refine"] is None else RefineSettings(
            method=options["refine"],
            steps=options["refine_steps"],
            lr=options["refine_lr"],
            logit_scale=options["refine_logit_scale"],
            alpha=options["refine_alpha"],
            batch=options["refine_batch"],
            seqlen=options["refine_seqlen"],
            windows=options["refine_windows"],
            holdout=options["refine_holdout"],
            candidates=options["refine_candidates"],
            weights=options["refine_weights"],
            estimator=options["refine_estimator"],
            seed=options["seed"],
            progress=not options["quiet"],
        ),
        recover=None if options["recover"] is None else RecoverSettings(
            optimizer=options["recover"],
            steps=options["recover_steps"],
            lr=options["recover_lr"],
            batch=options["recover_batch"],
            seqlen=options["recover_seqlen"],
            p=options["recover_p"],
            tau=options["recover_tau"],
            granularity=options["recover_granularity"],
            train_other=options["recover_train_other"],
            seed=options["seed"],
            debug=options["recover_debug"],
            progress=not options["quiet"],
        ),
        progress=not options["quiet"],
    )
    settings.check()
    started = time.perf_counter()
    loaded = load_model(options["model"], cache_dir=options["cache_dir"])
    report = run_pipeline(loaded, settings, load_seconds=time.perf_counter() - started)
    click.echo(report.table())
    if options["output"] is not None:
        def figures(folder: Path) -> None:
            if report.allocation is not None:
                plot_allocation(report.allocation, report.target["sparsity"], folder / "allocation.png")
            if report.refine is not None:
                plot_refine(report.refine, folder / "refine.png")
            if report.recover is not None:
                plot_recover(report.recover, folder / "recover.png")

        save_pruned(loaded, report, options["output"], overwrite=options["overwrite"], extra=figures)
        click.echo(f"saved the pruned model, tokenizer and report.json to {options['output']}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input is one line on stderr and exit code 2."""
    try:
        command.main(args=argv, prog_name="prune", standalone_mode=False)
    except click.ClickException as error:
        click.echo(f"prune: error: {error.format_message()}", err=True)
        sys.exit(2)
    except USER_ERRORS as error:
        click.echo(f"prune: error: {error}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("prune: aborted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
