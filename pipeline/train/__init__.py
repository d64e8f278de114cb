"""The bundled preference trainer.

    data.py        read pair / ranked-list tables; tokenize each piece once (chat template, one BOS, one EOS)
    collate.py     one padded batch per micro-batch ([chosen ; rejected], or one shared-prompt row per pair)
    head.py        token-chunked LM head + log-softmax (custom autograd; never holds [tokens, vocab] logits)
    forward.py     summed completion log-probs: transformer body, then the head on scored positions only
    refcache.py    reference log-probs computed once, stored as Arrow columns in a fingerprinted parquet file
    losses/        every pairwise and list loss (pair_loss, list_loss)
    config.py      TrainConfig (YAML or options)
    trainer.py     the loop: grad accumulation with global-count scaling, metrics.jsonl, checkpoints
    checkpoint.py  safetensors checkpoints + tokenizer
    cli.py         `prefpipe train`
    sft.py         greedy accuracy of an in-memory model on the bundled task (SFT runs' periodic evals)
    tiny.py        tiny random Llama + char tokenizer built in code (tests, benchmarks)
"""
