"""ScaleQuest-style question synthesis from scratch, on the embedded word-problem domain.

ScaleQuest (Ding et al., 2024) has a small solver model write new math questions: question
fine-tuning (QFT) on questions alone, question preference optimization (QPO) toward
solvable and harder questions, filters for language, solvability, difficulty and
duplicates, and the best of several sampled responses by a reward model. Here the domain
is the arithmetic word problems of `jaxsys.data.corpus`, whose exact verifier plays the
solvability checker and the reward (it only judges sampled solutions; it never writes one),
and every model is a jaxsys model trained by `jaxsys.train` and sampled with the batched
`jaxsys.decode.Decoder`. What differs from the paper: the solver is trained here on the
seed problems (not a pretrained instruct model), QPO's preferences come from verifier and
solver labels instead of a model's rewrites, and one set of k solver samples per question
serves both the difficulty filter and the choice of the response.

Stages, each a JSONL file with counts under the run folder (`stages.py`): seeds and test
sets, solver, solver_accuracy (its greedy accuracy on both test sets), qft, qft_questions,
filter/attempts/responses of the QFT questions, qpo_pairs, qpo_train, qpo_questions,
filter/attempts/responses of the QPO questions, unfiltered, generator_extra, and one
student per data set.

    python -m experiments.scalequest [--quick] [--out DIR]
"""
