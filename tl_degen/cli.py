"""The ``tl-degen`` command.

    tl-degen demo [--out tl_degen_report]      shipped modadd model → bases → graph →
                                               ablations, basis comparison → report folder
    tl-degen fit   --model M --tokens T --sites S [--method lib] --out bases.safetensors
    tl-degen graph --model M --tokens T --sites S --out graph.safetensors [--html g.html]
    tl-degen show  graph.safetensors [--out graph.html] [--no-open]
    tl-degen compare --model M --sites S [--task ioi | --clean C --corrupted K --answers A]
                     --out compare.safetensors [--png compare.png]

Under ``torchrun --nproc_per_node N -m tl_degen.cli fit ...`` (or ``torchrun ... $(which
tl-degen) fit ...``) each process joins one process group (gloo on CPU, NCCL when CUDA is
available), takes its share of the tokens (``tokens.tensor_split(N)[rank]``), statistics are
reduced across processes, and rank 0 alone writes the output file, atomically.
``fit --checkpoint ckpt.safetensors`` keeps the fit's accumulators there every
``--checkpoint-every`` batches; run the same command again after an interruption to resume.

``--model`` is ``modadd`` (the shipped model), a local Hugging Face folder, a
HookedTransformer state dict (``.pt``/``.safetensors``) with ``--config cfg.json``, or a
TransformerLens model name (downloaded by TransformerLens; needs the network). ``--tokens``
is a ``[batch, pos]`` integer tensor file (``.pt``, ``.safetensors``, ``.npy``) or a text
file with one prompt per line (tokenized with the model's tokenizer; prompts keep their own
lengths: no padding enters a statistic and ``:last`` is each prompt's last token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import webbrowser
from pathlib import Path

import torch

from tl_degen.errors import ArgumentError, TLDegenError

DEMO_SITES = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
              "logits:last"]
PATCH_SITES = ["resid_mid.0:last", "mlp_post.0:last"]
REFERENCE_SITES = ["resid_pre.0", "resid_mid.0:last", "resid_post.0:last", "logits:last"]


# ---------------------------------------------------------------------------- demo
def _check_report_folder(out: Path) -> None:
    """The demo replaces only a folder it wrote before (index.html and report.json in it) or
    an empty one; anything else is the user's and is refused before any work."""
    from tl_degen.viz.report import Report

    try:
        Report.check_folder(out)
    except ArgumentError as err:
        raise ArgumentError(f"--out {err}") from None


def demo(args: argparse.Namespace) -> int:
    import tl_degen
    from tl_degen import viz
    from tl_degen.toy import modadd
    from tl_degen.viz.report import Report

    start_all = time.perf_counter()
    started: dict[str, float] = {}
    timings: dict[str, float] = {}  # finished steps only, in seconds
    progress = not args.quiet

    def step(name: str):
        if progress:
            print(f"[{time.perf_counter() - start_all:5.1f} s] {name}", flush=True)
        started[name] = time.perf_counter()

    def done(name: str):
        timings[name] = time.perf_counter() - started.pop(name)

    out = Path(args.out)
    _check_report_folder(out)  # before any work
    if args.threads is not None:
        if args.threads < 1:
            raise ArgumentError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    step("load model")
    model = modadd.load_bridge(args.checkpoint)  # float32; bases and graphs fit in float64
    train, test = modadd.train_test_split()
    tokens = modadd.tokens_for(train)
    acc = modadd.accuracy(modadd.load_state_dict(args.checkpoint), test)
    done("load model")

    bases = {}
    for method in ("lib", "pca", "neuron"):
        step(f"fit {method} bases")
        bases[method] = tl_degen.fit_bases(model, tokens, DEMO_SITES, method=method,
                                           progress=False)
        done(f"fit {method} bases")
    lib = bases["lib"]
    step("interaction graph (LIB)")
    graph = tl_degen.interaction_graph(model, tokens, lib, progress=False)
    done("interaction graph (LIB)")
    step("edge-mass graphs (LIB, PCA; reference sites)")
    mass_graphs = {}
    for method in ("lib", "pca"):
        ref_bases = tl_degen.fit_bases(model, tokens, REFERENCE_SITES, method=method,
                                       progress=False)
        mass_graphs[method.upper()] = tl_degen.interaction_graph(
            model, tokens, ref_bases, progress=False)
    done("edge-mass graphs (LIB, PCA; reference sites)")
    step("modules and Fourier labels")
    modules = graph.modules(resolution=1.0, seed=0)
    labels = viz.modadd_labels(model, lib)
    done("modules and Fourier labels")

    step("ablation curves")
    curves = {}
    held_out = test[:3000]  # enough for a curve; all 8939 would only take longer
    labels_test, test_tokens = modadd.labels_for(held_out), modadd.tokens_for(held_out)
    for site in ("resid_mid.0:last", "mlp_post.0:last"):
        for method, bset in bases.items():
            k = bset[site].k
            n_kept = sorted({int(round(k * f)) for f in
                             [0, .02, .04, .06, .08, .1, .15, .2, .3, .4, .6, .8, 1.0]})
            curves[(site, method)] = tl_degen.ablation_curve(
                model, test_tokens, bset, site, "accuracy", n_kept=n_kept, labels=labels_test,
                progress=False)
    done("ablation curves")

    step("comparing bases by patching")
    clean, corrupted, logit_diff = modadd.patching_pairs(300, seed=0)
    comparison = tl_degen.compare_bases(model, clean, corrupted, logit_diff, PATCH_SITES,
                                        bases=bases, ablation=False, progress=False)
    done("comparing bases by patching")
    step("degeneracy report")
    degeneracy = tl_degen.degeneracy_report(model, tokens, DEMO_SITES, bases=lib,
                                            progress=False)
    done("degeneracy report")

    step("write report")
    report = Report("tl_degen demo: the shipped modular-addition transformer (p = 113)")
    report.add_text("Model and data", (
        f"1-layer transformer, d_model 128, 4 heads, d_mlp 512, ReLU, no LayerNorm\n"
        f"test accuracy {acc:.4f} on {len(test)} held-out pairs; bases fitted on "
        f"{tokens.shape[0]} training pairs\nsites: {', '.join(DEMO_SITES)}"))
    report.add_graph("Interaction graph (LIB)", graph.prune(mass=0.99), labels=labels,
                     modules=modules, title="LIB interaction graph, 99% of edge mass per "
                     "layer pair, coloured by Leiden module, labelled by Fourier content")
    report.add_text("Bases", "\n\n".join(b.summary() for b in bases.values()))
    report.add_text("Modules", f"{modules!r}\n" + "\n".join(
        f"  module {i}: {len(c)} nodes, e.g. " + ", ".join(
            f"{n} [{labels.get(n, '')}]" for n in c[:4]) for i, c in
        enumerate(modules.clusters[:8])))
    report.add_plots("Spectra", {
        f"spectrum_{s.split(':')[0].replace('.', '_')}": viz.spectrum_plot(
            {"LIB": lib, "PCA": bases["pca"]}, s) for s in DEMO_SITES[:-1]})
    report.add_plots(f"Ablation curves (accuracy on {len(held_out)} held-out pairs)", {
        f"ablation_{site.split(':')[0].replace('.', '_')}": viz.ablation_plot(
            [curves[(site, m)] for m in bases], title=f"Mean-ablating all but n directions "
            f"at {site}") for site in ("resid_mid.0:last", "mlp_post.0:last")})
    report.add_plots("Edge mass", {"edge_mass": viz.edge_mass_plot(
        mass_graphs, title="Edge mass held by the strongest edges (reference sites)")})
    report.add_text("Patching: which basis explains the task", (
        f"{clean.shape[0]} clean pairs (a, b) against corrupted (a′, b), logit difference; "
        "directions patched cumulatively in order of |attribution|. Directions needed for a "
        "fraction of the whole-site effect (95% bootstrap interval over pairs):\n\n"
        + comparison.table() + "\n\nnoising (run clean, patch in corrupted):\n\n"
        + comparison.table(mode="noising")))
    report.add_plots("Patching curves", {
        f"patching_{site.split(':')[0].replace('.', '_')}": comparison.plot(site)
        for site in PATCH_SITES})
    report.add_text("Degeneracy", degeneracy.table())
    report.add_text("Timings", "\n".join(f"{v:6.2f} s  {k}" for k, v in timings.items()))
    text_sites = [s for s in lib.sites if s.kind == "resid_pre"]
    if text_sites:
        shown = tokens[:40]
        view = viz.token_view_html(model, shown, lib[text_sites[0]], [1, 2, 3, 4],
                                   n_examples=5, labels=labels, token_strings=[
                                       [str(int(a)), str(int(b)), "="] for a, b, _ in shown])
        report.files["tokens.html"] = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Token view</title>"
            f"</head><body>{view}</body></html>")
        report.add_html("Token view", '<p><a href="tokens.html">Which tokens activate LIB '
                        f"directions 1–4 of {text_sites[0].name}</a> (circuitsvis, offline)</p>")
    with tempfile.TemporaryDirectory() as tmp:
        report.files["graph.safetensors"] = graph.save(Path(tmp) / "g.safetensors").read_bytes()
        report.files["comparison.safetensors"] = comparison.save(
            Path(tmp) / "c.safetensors").read_bytes()
    report.data = {
        "test_accuracy": acc, "timings": {k: v for k, v in timings.items()},
        "graph_edges": graph.n_edges(), "modules": {"n": len(modules.clusters),
                                                    "Q": modules.modularity},
        "patching": {site: {b: {"k": comparison.k[site][b], **{
            f"n{round(f * 100)}": comparison.needed(site, b, f).n for f in (0.5, 0.9, 0.99)}}
            for b in comparison.bases} for site in PATCH_SITES},
        "degeneracy": degeneracy.as_dict()}
    folder = report.write(out)
    done("write report")
    total = time.perf_counter() - start_all
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"report written to {folder / 'index.html'} in {total:.1f} s "
          f"({size / 2**20:.1f} MiB in {sum(p.is_file() for p in folder.rglob('*'))} files)")
    if not args.quiet:
        print(lib.summary())
    return 0


# ---------------------------------------------------------------------------- user models
def load_model(spec: str, config: str | None = None, dtype: str = "float32"):
    """A model from ``--model`` (see the module docstring)."""
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype)
    if torch_dtype is None:
        raise ArgumentError(f"--dtype {dtype!r} cannot run the model here; use float32 (fast) "
                            "or float64 (exact)")
    if spec == "modadd":
        from tl_degen.toy import modadd

        return modadd.load_bridge(dtype=torch_dtype)
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ArgumentError(f"{path} has no config.json; give a Hugging Face model folder "
                                "(save_pretrained) or a state-dict file with --config")
        import transformer_lens.model_bridge.sources.transformers  # noqa: F401
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(str(path))
        tok = AutoTokenizer.from_pretrained(str(path))
        return TransformerBridge.boot_transformers(str(path), hf_model=hf,
                                                   tokenizer=tok).to(torch_dtype).eval()
    if path.suffix in (".pt", ".pth", ".safetensors", ".bin"):
        if not path.exists():
            raise ArgumentError(f"no such file {path}")
        if config is None:
            raise ArgumentError(f"{path} is a state dict: also give --config cfg.json with the "
                                "HookedTransformerConfig fields (d_model, n_layers, ...)")
        cfg = _read_config(Path(config))
        sd = _load_tensors(path)
        try:
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            model = HookedTransformer(_config(HookedTransformerConfig, cfg, config))
            result = model.load_state_dict(sd, strict=False)
            missing = [k for k in result.missing_keys if not k.endswith(("mask", "IGNORE"))]
            if missing or result.unexpected_keys:
                raise ArgumentError(
                    f"{path} does not match --config: missing {missing[:4]}, unexpected "
                    f"{result.unexpected_keys[:4]}; give a HookedTransformer state dict")
            return model.to(torch_dtype).eval()
        except ImportError:
            from transformer_lens.config import TransformerBridgeConfig
            from transformer_lens.model_bridge import TransformerBridge
            from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

            bcfg = _config(TransformerBridgeConfig, cfg, config)
            model = TransformerBridge.boot_native(bcfg).to(torch_dtype)
            try:
                model.load_state_dict(convert_tl_checkpoint(sd, bcfg), strict=True)
            except (RuntimeError, KeyError, ValueError) as exc:
                raise ArgumentError(f"{path} does not match --config ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:160]}); give a "
                                    "HookedTransformer-format state dict") from None
            return model.eval()
    if path.exists() or path.suffix in (".json", ".npy", ".npz", ".ckpt", ".gguf"):
        raise ArgumentError(f"cannot read a model from {spec!r}: give 'modadd', a Hugging Face "
                            "folder, a .pt/.safetensors state dict with --config, or a model "
                            "name")
    try:
        try:
            from transformer_lens import HookedTransformer

            return HookedTransformer.from_pretrained(spec).to(torch_dtype).eval()
        except ImportError:
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_transformers(spec).to(torch_dtype).eval()
    except Exception as exc:  # noqa: BLE001  (network, unknown name, ...)
        raise ArgumentError(f"could not load model {spec!r} ({type(exc).__name__}); offline, "
                            "pass a local Hugging Face folder or a state dict with --config"
                            ) from None


def _read_config(path: Path) -> dict:
    """The JSON object of a ``--config`` file."""
    if not path.is_file():
        raise ArgumentError(f"--config {path}: no such file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArgumentError(f"--config {path} is not valid JSON ({err}); write the "
                            "HookedTransformerConfig fields as a JSON object") from None
    if not isinstance(cfg, dict):
        raise ArgumentError(f"--config {path} holds a JSON {type(cfg).__name__}; write an "
                            'object of config fields, e.g. {"d_model": 128, "n_layers": 1, ...}')
    return cfg


def _config(cls, cfg: dict, path: str):
    """``cls(**cfg)``, an unknown or missing field named with the file."""
    try:
        return cls(**cfg)
    except (TypeError, ValueError, AssertionError) as err:
        raise ArgumentError(f"--config {path}: {err}; use the fields of "
                            f"{cls.__name__}") from None


def _load_tensors(path: Path) -> dict:
    """The tensors of a ``.safetensors`` file or a ``torch.save``'d dict of tensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch, pickle and safetensors raise their own)
        raise ArgumentError(f"{path} is not a readable {path.suffix} file "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:120]})"
                            ) from None
    if not isinstance(obj, dict):
        raise ArgumentError(f"{path} does not hold a state dict")
    return obj


def load_tokens(spec: str, model) -> torch.Tensor | list[torch.Tensor]:
    """``[batch, pos]`` token ids from ``--tokens``, or for a text file one 1-D tensor per
    prompt, each of its own length (see the module docstring)."""
    path = Path(spec)
    if not path.exists():
        raise ArgumentError(f"no such tokens file {spec!r}")
    if path.suffix in (".pt", ".pth"):
        try:
            t = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (pickle and zip errors of every kind)
            raise ArgumentError(f"{path} is not a readable torch.save file "
                                f"({type(err).__name__}); save a [batch, pos] tensor with "
                                "torch.save(tokens, path)") from None
    elif path.suffix == ".safetensors":
        tensors = _load_tensors(path)
        if len(tensors) != 1:
            raise ArgumentError(f"{path} holds {len(tensors)} tensors; save one [batch, pos] "
                                "tensor")
        t = next(iter(tensors.values()))
    elif path.suffix == ".npy":
        import numpy as np

        try:
            t = torch.as_tensor(np.load(str(path), allow_pickle=False))
        except Exception as err:  # noqa: BLE001  (numpy raises ValueError, OSError, ...)
            raise ArgumentError(f"{path} is not a readable .npy array ({type(err).__name__}); "
                                "save a [batch, pos] integer array with numpy.save") from None
    elif path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ArgumentError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#x} at "
                                f"offset {err.start}); save the prompts as UTF-8, e.g. iconv "
                                "-f latin1 -t utf-8") from None
        lines = [ln for ln in text.splitlines() if ln.strip()]
        tok = getattr(model, "tokenizer", None)
        if not lines:
            raise ArgumentError(f"{path} has no prompts (one per line)")
        if tok is None:
            raise ArgumentError("this model has no tokenizer; give token ids (.pt/.npy)")
        ids = [tok(ln)["input_ids"] for ln in lines]
        if min(len(i) for i in ids) == 0:
            raise ArgumentError(f"{path} has a line that tokenizes to nothing")
        # whole prompts, of their own lengths (fit_bases groups them by length)
        return [torch.tensor(i) for i in ids]
    else:
        raise ArgumentError(f"tokens must be .pt, .safetensors, .npy or .txt, not "
                            f"{path.suffix!r}")
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ArgumentError(f"{path} must hold one [batch, pos] integer tensor")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ArgumentError(f"{path} holds {str(t.dtype).replace('torch.', '')} values; token "
                            "ids are integers (convert with .long())")
    return t


class _Launch:
    """This process's place in a ``torchrun`` launch: rank, world size and device.

    Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) it is rank 0 of 1 on the
    CPU and does nothing. Under it, the default process group is initialised (NCCL with one
    GPU per process when CUDA is available, gloo otherwise) and destroyed on exit.
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        self._owns = False

    def __enter__(self) -> _Launch:
        if self.world <= 1:
            return self
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.device = torch.device("cuda", local)
                dist.init_process_group("nccl")
            else:
                dist.init_process_group("gloo")
            self._owns = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._owns:
            import torch.distributed as dist

            if exc_type is None:  # wait for rank 0's writing before tearing the group down
                dist.barrier()
            dist.destroy_process_group()

    def shard(self, tokens: torch.Tensor | list[torch.Tensor]):
        """This rank's rows of ``tokens`` (contiguous, as equal as the count allows)."""
        if self.world <= 1:
            return tokens
        if len(tokens) < self.world:
            raise ArgumentError(f"{len(tokens)} sequences cannot be shared by {self.world} "
                                "processes; give at least one sequence per process")
        if isinstance(tokens, list):
            bounds = torch.arange(len(tokens)).tensor_split(self.world)[self.rank]
            return tokens[int(bounds[0]):int(bounds[-1]) + 1]
        return tokens.tensor_split(self.world)[self.rank]

    def say(self, *lines: str) -> None:
        """Print on rank 0 only."""
        if self.rank == 0:
            for line in lines:
                print(line)


def _check_outputs(*paths) -> None:
    """Every output path is usable before any work: not a folder, and no part of its folder
    an existing file (missing folders are created when the file is written)."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise ArgumentError(f"{path} is a folder; give a file name")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ArgumentError(f"cannot write {path}: {parent} is a file")
                break


def _fit_common(args, launch: _Launch, **fit_kwargs):
    import tl_degen

    _check_outputs(args.out, getattr(args, "html", None))

    model = load_model(args.model, args.config, args.dtype).to(launch.device)
    tokens = launch.shard(load_tokens(args.tokens, model))
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    bases = tl_degen.fit_bases(model, tokens, sites, method=args.method,
                               batch_size=args.batch_size, n_probes=args.n_probes,
                               progress=not args.quiet and launch.rank == 0, **fit_kwargs)
    return tl_degen, model, tokens, bases


def fit(args: argparse.Namespace) -> int:
    if args.checkpoint_every < 1:
        raise ArgumentError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    with _Launch() as launch:
        _, _, _, bases = _fit_common(args, launch, checkpoint=args.checkpoint,
                                     checkpoint_every=args.checkpoint_every)
        if launch.rank == 0:
            path = bases.save(args.out)
            launch.say(bases.summary(), f"saved to {path}")
    return 0


def graph(args: argparse.Namespace) -> int:
    from tl_degen.viz import lm_labels, modadd_labels, save_graph_page

    if args.top < 1:
        raise ArgumentError(f"--top must be at least 1, got {args.top}")
    html_path = Path(args.html) if args.html else Path(args.out).with_suffix(".html")
    if html_path.resolve() == Path(args.out).resolve():
        raise ArgumentError(f"--html and --out are the same file {html_path}; give --html "
                            "page.html")
    with _Launch() as launch:
        tl_degen, model, tokens, bases = _fit_common(args, launch)
        g = tl_degen.interaction_graph(model, tokens, bases, batch_size=args.batch_size,
                                       n_probes=args.n_probes,
                                       progress=not args.quiet and launch.rank == 0)
        if launch.rank == 0:
            path = g.save(args.out)
            # node labels: Fourier content on modadd; else output tokens and peak contexts
            labels = (modadd_labels(model, bases) if args.model == "modadd" else
                      lm_labels(model, tokens[:512], bases, batch_size=args.batch_size))
            save_graph_page(g.prune(mass=0.99), html_path, top_nodes=args.top, labels=labels)
            launch.say(g.summary(), f"saved to {path}; page {html_path}")
    return 0


def show(args: argparse.Namespace) -> int:
    from tl_degen.graph import InteractionGraph
    from tl_degen.viz import save_graph_page

    path = Path(args.file)
    if not path.exists():
        raise ArgumentError(f"no such file {path}; give a graph saved by tl-degen graph or "
                            "InteractionGraph.save")
    out = Path(args.out) if args.out else path.with_suffix(".html")
    if out.resolve() == path.resolve():
        raise ArgumentError(f"the page would overwrite the graph file {path}; give --out "
                            "page.html")
    if not 0 < args.mass <= 1:  # NaN fails too
        raise ArgumentError(f"--mass must be a fraction in (0, 1], got {args.mass}")
    if args.top < 1:
        raise ArgumentError(f"--top must be at least 1, got {args.top}")
    _check_outputs(out)
    g = InteractionGraph.load(path)
    g = g.prune(mass=args.mass) if args.mass < 1 else g
    save_graph_page(g, out, title=f"Interaction graph: {path.name}", top_nodes=args.top)
    print(f"wrote {out}")
    if not args.no_open:
        webbrowser.open(out.resolve().as_uri())
    return 0


def compare(args: argparse.Namespace) -> int:
    """LIB, PCA and neuron bases on one task: the directions needed for 50/90/99 % of the
    metric by cumulative patching (tl_degen.compare_bases)."""
    import tl_degen

    if args.pairs < 2:
        raise ArgumentError(f"--pairs must be at least 2, got {args.pairs}")
    out = Path(args.out)
    png = Path(args.png) if args.png else None
    _check_outputs(out, png)  # every output path is checked before any work
    if out.suffix != ".safetensors":
        raise ArgumentError(f"--out must end in .safetensors, got {out.name!r}")
    if png is not None and png.suffix != ".png":
        raise ArgumentError(f"--png must end in .png, got {png.name!r}")
    model = load_model(args.model, args.config, args.dtype)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    files = [args.clean, args.corrupted, args.answers]
    if any(files) and not all(files):
        raise ArgumentError("give --clean, --corrupted and --answers together")
    if all(files):
        clean, corrupted = load_tokens(args.clean, model), load_tokens(args.corrupted, model)
        answers = load_tokens(args.answers, model)
        if not all(isinstance(t, torch.Tensor) for t in (clean, corrupted, answers)):
            raise ArgumentError("--clean and --corrupted must be [batch, pos] token tensors of "
                                "equal shape and --answers a [batch, 2] tensor (correct, wrong)")
        if answers.shape != (clean.shape[0], 2):
            raise ArgumentError(f"--answers must be [batch, 2] (correct, wrong token ids), "
                                f"got {tuple(answers.shape)} for {clean.shape[0]} prompts")
        right, wrong = answers[:, 0].long(), answers[:, 1].long()
        from tl_degen.adapters import get_adapter

        d_vocab = get_adapter(model).d_vocab
        if int(answers.min()) < 0 or int(answers.max()) >= d_vocab:
            raise ArgumentError(f"--answers holds token ids outside [0, {d_vocab}) (from "
                                f"{int(answers.min())} to {int(answers.max())})")
        what = f"{clean.shape[0]} prompt pairs from {args.clean}"

        def metric(logits: torch.Tensor) -> torch.Tensor:
            last = logits[:, -1]
            rows = torch.arange(logits.shape[0], device=last.device)
            return last[rows, right.to(last.device)] - last[rows, wrong.to(last.device)]
    elif args.model == "modadd" and args.task in (None, "modadd"):
        from tl_degen.toy import modadd

        clean, corrupted, metric = modadd.patching_pairs(args.pairs, seed=0)
        what = f"{args.pairs} modadd pairs (a, b) against (a', b), logit difference"
    elif args.model == "modadd":
        raise ArgumentError("the modadd model has no tokenizer for --task ioi; use --task modadd")
    elif args.task in (None, "ioi"):
        from tl_degen.tasks import ioi

        task = ioi(model, args.pairs, seed=0)
        clean, corrupted, metric = task.clean, task.corrupted, task.logit_difference
        what = f"{args.pairs} indirect-object pairs, logit difference"
    else:
        raise ArgumentError(f"--task {args.task} is for the modadd model; use --task ioi or "
                            "give --clean, --corrupted and --answers")
    fit_kwargs = {"batch_size": args.batch_size, "n_probes": args.n_probes}
    cmp = tl_degen.compare_bases(model, clean, corrupted, metric, sites, progress=not args.quiet,
                                 fit_kwargs=fit_kwargs, ablation=not args.no_ablation)
    cmp.save(out)
    print(f"{what}\n{cmp!r}\nsaved to {out}")
    if png is not None:
        fig = cmp.figure()
        png.parent.mkdir(parents=True, exist_ok=True)
        tmp = png.with_name(png.name + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, png)
        print(f"figure {png}")
    return 0


# ---------------------------------------------------------------------------- parser
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="modadd, a HF folder, a state dict, or a "
                   "TransformerLens model name")
    p.add_argument("--config", help="JSON HookedTransformerConfig fields for a state dict")
    p.add_argument("--tokens", required=True, help=".pt/.safetensors/.npy [batch, pos] or .txt")
    p.add_argument("--sites", required=True, help="comma-separated, in forward order, e.g. "
                   "resid_pre.0,resid_mid.0:last,resid_post.0:last,logits:last")
    p.add_argument("--method", default="lib", choices=["lib", "pca", "neuron"])
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per pass (default: from the memory budget)")
    p.add_argument("--n-probes", type=int, default=None,
                   help="stochastic estimate with this many probes (language models)")
    p.add_argument("--dtype", default="float32", help="model dtype while fitting")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, as every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"tl-degen: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tl-degen", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="the shipped modadd model → a report folder")
    d.add_argument("--out", default="tl_degen_report", help="report folder: new, empty, or an "
                   "earlier report (replaced)")
    d.add_argument("--checkpoint", help="a HookedTransformer-format modadd state dict")
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--quiet", action="store_true", help="only the final line")
    d.set_defaults(func=demo)
    f = sub.add_parser("fit", help="fit bases of your model; save them")
    _model_args(f)
    f.add_argument("--out", required=True, help="bases file (.safetensors)")
    f.add_argument("--checkpoint", help="keep the fit's accumulators in this file; if it "
                   "exists, resume from it (removed when the fit completes)")
    f.add_argument("--checkpoint-every", type=int, default=10,
                   help="batches between checkpoint writes (default 10)")
    f.set_defaults(func=fit)
    g = sub.add_parser("graph", help="fit bases and the interaction graph; save and draw it")
    _model_args(g)
    g.add_argument("--out", required=True, help="graph file (.safetensors)")
    g.add_argument("--html", help="graph page (default: next to --out)")
    g.add_argument("--top", type=int, default=8, help="directions per site in the page's "
                   "circuit view (default 8)")
    g.set_defaults(func=graph)
    s = sub.add_parser("show", help="draw a saved graph as a page and open it")
    s.add_argument("file", help="a graph .safetensors file")
    s.add_argument("--out", help="page to write (default: FILE.html)")
    s.add_argument("--mass", type=float, default=0.99, help="edge mass kept per layer pair")
    s.add_argument("--no-open", action="store_true", help="do not open a browser")
    s.add_argument("--top", type=int, default=8, help="directions per site in the circuit "
                   "view (default 8)")
    s.set_defaults(func=show)
    c = sub.add_parser("compare", help="which basis explains a task: LIB, PCA and neurons by "
                       "cumulative patching and node ablation")
    c.add_argument("--model", required=True, help="modadd, a HF folder, a state dict, or a "
                   "TransformerLens model name")
    c.add_argument("--config", help="JSON HookedTransformerConfig fields for a state dict")
    c.add_argument("--sites", required=True, help="comma-separated sites to compare, e.g. "
                   "resid_mid.0:last,mlp_post.0:last")
    c.add_argument("--task", choices=["modadd", "ioi"], help="built-in prompt pairs (default: "
                   "modadd for the modadd model, else indirect-object identification)")
    c.add_argument("--pairs", type=int, default=96, help="prompt pairs of the task (default 96)")
    c.add_argument("--clean", help="your clean prompts (.pt/.npy/.safetensors [batch, pos])")
    c.add_argument("--corrupted", help="your corrupted prompts, same shape")
    c.add_argument("--answers", help="[batch, 2] token ids (correct, wrong); the metric is "
                   "their logit difference at the last position")
    c.add_argument("--out", required=True, help="result file (.safetensors)")
    c.add_argument("--png", help="also draw the curves into this .png")
    c.add_argument("--no-ablation", action="store_true", help="patching curves only")
    c.add_argument("--batch-size", type=int, default=None, help="sequences per pass")
    c.add_argument("--n-probes", type=int, default=None, help="stochastic fit (language models)")
    c.add_argument("--dtype", default="float32", help="model dtype")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TLDegenError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"tl-degen: error: {msg}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, json.JSONDecodeError) as err:
        print(f"tl-degen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
