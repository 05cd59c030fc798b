"""What the trainer (npgpt/train.py) is made of, one floor below it:

    config.py     TrainConfig: every setting of a run, flat keys grouped in sections (run, model, optim,
                  parallel, sft, distill, lora), each section checked once; --set and config-file parsing
    plugins.py    the standard plugins train(cfg) always runs: pruning masks, distillation, LoRA
    scaler.py     DynamicLossScaler: loss scaling for fp16 training
"""
