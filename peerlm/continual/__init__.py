"""Continual learning: teach a trained model new knowledge and measure what it forgets.

    memory.py     which memory rows a batch retrieves (hooks on the product keys), their TF-IDF
                  ranking against background document frequencies, and row-sparse gradient masks
    background.py the background document frequencies of a run's own training data, cached
    grow.py       growing a PEER layer's product keys from n to n + m sub-keys per half (new experts)
    lora.py       LoRA adapters on the trunk's linear layers through Hugging Face ``peft``; merging
    facts.py      a deterministic synthetic biography fact set (bioS-style) and its exact-match test
    finetune.py   ``finetune``: a new run from a trained run's checkpoint with one of the methods
                  full, lora, memory, sparse, grow, on the training loop's guarantees
    study.py      ``peerlm study continual``: learning against forgetting per method and knob
    study_report.py  its summary.json, table.md and Pareto plot
    cli.py        the ``peerlm finetune`` and ``peerlm facts`` commands

Methods (``finetune.METHODS``): ``full`` trains every parameter with AdamW; ``lora`` trains adapters
on the trunk's linear layers; ``memory`` trains the PEER tables / PKM values with row-sparse
gradients and the lazy row-sparse AdamW, routing frozen; ``sparse`` is sparse memory finetuning (Lin
et al. 2025, arXiv 2510.15103): per step only the ``t`` retrieved rows with the highest TF-IDF
against the base run's training data are updated, by SGD; ``grow`` adds experts to a PEER layer and
trains only them and their sub-keys.
"""
