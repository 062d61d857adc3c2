"""Sample quality: Frechet distance and KID of features, reference statistics, error to a reference solve."""
from .features import EXTRACTORS, InceptionFeatures, PixelFeatures, extract_features, get_extractor, inception_path
from .frechet import fid_from_features, frechet_distance, kid, mmd2_unbiased, sqrtm_psd, trace_sqrt_product
from .reference import psnr, reference_error, reference_solve, rmse
from .stats import feature_stats, load_stats, save_stats

__all__ = ["frechet_distance", "kid", "mmd2_unbiased", "sqrtm_psd", "trace_sqrt_product",
           "feature_stats", "save_stats", "load_stats",
           "InceptionFeatures", "PixelFeatures", "get_extractor", "extract_features", "inception_path", "EXTRACTORS",
           "reference_solve", "rmse", "psnr", "reference_error", "fid_from_features"]

