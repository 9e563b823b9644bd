"""The GPT-versus-BERT study: how do a decoder (next-token pretraining) and an encoder (masked-token + next-sentence
pretraining) of matched size compare in accuracy and efficiency, after pretraining and after fine-tuning, and what do
fastformer's fused kernels change?

    fastformer compare --quick                       # CPU: a couple of minutes
    fastformer compare --device cuda --preset base   # a GPU: fused kernels vs the torch backend

or from Python: ``run_study(Options(quick=True))``. The modules, in the order a run uses them:

- ``config``: presets (tiny, small, base), the options, StudyError (bad input; the CLI exits with code 2);
- ``corpus``: the text (the installed Python standard library's prose by default, or ``--corpus``);
- ``tokenizer``: a byte-level BPE trained at run time and cached in the output directory;
- ``data``: passages, held-out split, GPT rows, BERT masked pairs, the classification set;
- ``models``: matched GPT and BERT, their classification heads, parameters and FLOPs per token;
- ``train``: pretraining and fine-tuning loops with progress bars, held-out evaluations;
- ``measure``: speed per backend, text samples, the fused-vs-torch equivalence check;
- ``report``, ``plots``: table, conclusion, report.md, study.json, PNG figures;
- ``run``: checks the options, runs the whole study, and publishes the output directory only when it succeeded.
"""

from fastformer.study.config import PRESETS, Options, Preset, StudyError
from fastformer.study.run import run_study

__all__ = ["PRESETS", "Options", "Preset", "StudyError", "run_study"]
