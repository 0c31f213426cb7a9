"""Pre-training of small Llama and V4-mini models: config (YAML), data (offline corpora, tokenizer), curriculum
(stages, easy-to-hard competence), trainer (checkpoints, exact resume, torchrun data parallelism), plots."""
