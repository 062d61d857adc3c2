"""Sample quality: Frechet distance and KID of features, reference statistics, error to a reference solve."""
from .features import (EXTRACTORS, INCEPTION_SHA1, InceptionFeatures, PixelFeatures, extract_features, file_sha1,
                       get_extractor, inception_path, resize_tf1_bilinear)
from .fid import CHUNK, KID_ROWS, GeneratedSource, ImageSource, Reference, cached_features, feature_cache_dir, score
from .frechet import (fid_from_features, frechet_distance, frechet_distance_to_features, frechet_distances, kid,
                      mmd2_unbiased, sqrtm_psd, trace_sqrt_product)
from .reference import psnr, reference_error, reference_solve, rmse
from .stats import feature_stats, load_stats, save_stats

__all__ = ["frechet_distance", "frechet_distances", "frechet_distance_to_features", "kid", "mmd2_unbiased", "sqrtm_psd",
           "trace_sqrt_product",
           "feature_stats", "save_stats", "load_stats",
           "InceptionFeatures", "PixelFeatures", "get_extractor", "extract_features", "inception_path", "EXTRACTORS",
           "resize_tf1_bilinear", "file_sha1", "INCEPTION_SHA1",
           "ImageSource", "GeneratedSource", "cached_features", "Reference", "score", "feature_cache_dir", "CHUNK",
           "KID_ROWS",
           "reference_solve", "rmse", "psnr", "reference_error", "fid_from_features"]
