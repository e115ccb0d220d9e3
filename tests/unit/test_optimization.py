"""bf16 autocast in one process: the digits example's accuracy within one point of fp32's."""
import math


def test_bf16_digits_accuracy_within_one_point_of_fp32():
    from train_digits import main
    fp32 = main(["--epochs", "15", "--log-interval", "1000"])
    bf16 = main(["--epochs", "15", "--amp", "bf16", "--log-interval", "1000"])
    assert fp32["val_accuracy"][-1] >= 0.95
    assert math.isclose(bf16["val_accuracy"][-1], fp32["val_accuracy"][-1], abs_tol=0.01)
