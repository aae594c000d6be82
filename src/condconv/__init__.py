"""condconv: conditionally parameterized convolutions for PyTorch.

CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
NeurIPS 2019, arXiv:1904.04971), DynamicConv (Chen et al., CVPR 2020, arXiv:1912.03458) and ODConv
(Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022, arXiv:2209.07947) on one execution engine.
"""

from condconv.functional import (
    STRATEGIES,
    dynamic_conv2d,
    get_default_strategy,
    mix_kernels,
    select_strategy,
    set_default_strategy,
    use_strategy,
)
from condconv.layers import CondConv2d, DynamicConv2d, ODConv2d, make_conv2d
from condconv.routing import (
    OmniRouter,
    SigmoidRouter,
    SoftmaxRouter,
    TemperatureSchedule,
    set_temperature,
)

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "CondConv2d",
    "DynamicConv2d",
    "ODConv2d",
    "OmniRouter",
    "SigmoidRouter",
    "SoftmaxRouter",
    "TemperatureSchedule",
    "dynamic_conv2d",
    "get_default_strategy",
    "make_conv2d",
    "mix_kernels",
    "select_strategy",
    "set_default_strategy",
    "set_temperature",
    "use_strategy",
    "__version__",
]
# -- names added by the model zoo, counter, data/training and deployment modules go below this line --
from condconv.models import create_model, list_models, register_model  # noqa: E402
from condconv.profile import count_macs  # noqa: E402

__all__ += ["create_model", "list_models", "register_model", "count_macs"]
from condconv.convert import convert, list_convs, select_convs  # noqa: E402
from condconv.export import export_model, load_exported, verify_export  # noqa: E402

__all__ += ["convert", "list_convs", "select_convs", "export_model", "load_exported", "verify_export"]
from condconv.data import EpochLoader, build_dataset  # noqa: E402
from condconv.sweep import routing_statistics, sweep_grid  # noqa: E402
from condconv.train import TrainConfig, TrainResult, evaluate_checkpoint, load_checkpoint, train_model  # noqa: E402

__all__ += ["EpochLoader", "build_dataset", "TrainConfig", "TrainResult", "evaluate_checkpoint", "load_checkpoint",
            "train_model", "routing_statistics", "sweep_grid"]  # fmt: skip
