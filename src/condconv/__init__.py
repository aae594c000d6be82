"""condconv: conditionally parameterized convolutions for PyTorch.

CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
NeurIPS 2019, arXiv:1904.04971), DynamicConv (Chen et al., CVPR 2020, arXiv:1912.03458) and ODConv
(Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022, arXiv:2209.07947) on one execution engine.

The package is a set of folders, each a layer that imports only the ones below it::

    utils/     atomic files and locks, runtime settings, argument checks, these aliases
    nn/        the engine (functional, ops/), routers, layers, conversion, the per-example reference
    models/    registry, blocks, families, presets, the papers' tables, the MAC counter, the checkpoint format
    data/      embedded digits, CIFAR, ImageFolder, augmentation
    deploy/    export (ONNX, torch.export), int8
    training/  config, recipes, optimisers and schedules, EMA, the loop, evaluation, routing analysis, sweeps
    bench/     layer and model benchmarks
    cli/       the entry point and one module per subcommand

Every public name below is ``condconv.X``; a name's module is imported when the name is first used, so
``import condconv`` itself is cheap.
"""

from condconv.utils.aliases import install_moved_modules, lazy_attributes

__version__ = "0.3.0"

#: public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(["STRATEGIES", "conv_with_kernels", "dynamic_conv", "dynamic_conv1d", "dynamic_conv2d",
                     "dynamic_conv3d", "get_default_strategy", "mix_kernels", "select_strategy", "set_default_strategy",
                     "use_strategy"], "condconv.nn.functional"),
    **dict.fromkeys(["CondConv1d", "CondConv2d", "CondConv3d", "DynamicConv1d", "DynamicConv2d", "DynamicConv3d",
                     "ODConv1d", "ODConv2d", "ODConv3d", "make_conv2d"], "condconv.nn.layers"),
    **dict.fromkeys(["KernelWarehouse", "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear"],
                    "condconv.nn.kernel_warehouse"),
    **dict.fromkeys(["OmniRouter", "SigmoidRouter", "SoftmaxRouter", "TemperatureSchedule", "set_temperature"],
                    "condconv.nn.routing"),
    **dict.fromkeys(["convert", "list_convs", "select_convs"], "condconv.nn.convert"),
    **dict.fromkeys(["create_model", "list_models", "register_model"], "condconv.models"),
    "count_macs": "condconv.models.macs",
    "load_checkpoint": "condconv.models.checkpoint",
    "load_pretrained": "condconv.models.pretrained",
    **dict.fromkeys(["EpochLoader", "build_dataset"], "condconv.data"),
    **dict.fromkeys(["export_model", "load_exported", "verify_export"], "condconv.deploy.export"),
    "TrainConfig": "condconv.training.config",
    **dict.fromkeys(["TrainResult", "train_model"], "condconv.training.loop"),
    "evaluate_checkpoint": "condconv.training.evaluate",
    "routing_statistics": "condconv.training.analysis",
    "sweep_grid": "condconv.training.sweep",
}

__all__ = [*_PUBLIC, "__version__"]

__getattr__, __dir__ = lazy_attributes(__name__, _PUBLIC)
install_moved_modules()
