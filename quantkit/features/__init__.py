"""Pretrained patch features without downloading anything: quantkit's own MAE, the encoder interface, a probe.

    result = train_mae(MAETrainConfig(data="digits", steps=2000, out_dir="runs/mae"))   # or `quantkit train-features`
    encoder = load_feature_encoder("runs/mae")      # images (B, C, H, W) in [0, 1] -> (B, N, F), frozen
    mine = FeatureEncoder(my_timm_wrapper, image_shape=(3, 224, 224))   # any module with that output works
    print(probe_report(encoder))                    # linear-probe accuracy on digits vs raw pixels

Consumers: SoftVQ-VAE's alignment (:mod:`quantkit.tokenizers.softvq_vae`) and VQGAN-LC codebooks from features
(:meth:`quantkit.quantizers.VQGANLCQuantizer.from_encoder`).
"""
from .encoder import FeatureEncoder, as_feature_encoder
from .mae import MAE, MAEConfig, MAEOutput
from .probe import encode_dataset, linear_probe, probe_report
from .train import MAETrainConfig, MAETrainResult, load_feature_encoder, load_mae, train_mae

__all__ = ["FeatureEncoder", "MAE", "MAEConfig", "MAEOutput", "MAETrainConfig", "MAETrainResult",
           "as_feature_encoder", "encode_dataset", "linear_probe", "load_feature_encoder", "load_mae", "probe_report",
           "train_mae"]
