"""What the trainer (npgpt/train.py) is made of, one floor below it:

    scaler.py     DynamicLossScaler: loss scaling for fp16 training
"""
