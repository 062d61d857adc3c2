// Sigma schedules in the EDM parametrisation: steps + 1 strictly decreasing sigmas with
// sigmas[0] = sigma_max and sigmas[steps] = sigma_min (both pinned exactly).
// Same maths as geosample/schedules.py. Invalid input throws std::invalid_argument.
#pragma once

#include <vector>

namespace geosample {
namespace schedules {

constexpr double kSigmaMin = 0.002;
constexpr double kSigmaMax = 80.0;
constexpr double kVpEps = 1e-3;  // smallest VP time of the VP-SDE fitted to [kSigmaMin, kSigmaMax]

// EDM ("Karras"): sigma_i = (smax^(1/rho) + i/steps (smin^(1/rho) - smax^(1/rho)))^rho.
std::vector<double> polynomial(int steps, double sigma_min = kSigmaMin, double sigma_max = kSigmaMax,
                               double rho = 7.0);

// Uniform in lambda = -log sigma: sigma_i = smax (smin / smax)^(i/steps).
std::vector<double> logsnr(int steps, double sigma_min = kSigmaMin, double sigma_max = kSigmaMax);

// Uniform (rho = 1) or polynomial steps in VP time t_i = (1 + i/steps (eps^(1/rho) - 1))^rho,
// mapped to sigma by the VP-SDE of vp_params(sigma_min, sigma_max).
std::vector<double> time_uniform(int steps, double sigma_min = kSigmaMin, double sigma_max = kSigmaMax,
                                 double rho = 1.0);

// (beta_d, beta_min) of the linear VP-SDE with sigma(eps) = sigma_min, sigma(1) = sigma_max, where
// sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1.
struct VpParams {
    double beta_d;
    double beta_min;
};
VpParams vp_params(double sigma_min = kSigmaMin, double sigma_max = kSigmaMax, double eps = kVpEps);

// sigma(t) = sqrt(expm1(beta_d t^2 / 2 + beta_min t)).
double vp_sigma(double t, VpParams p);

// t(sigma) = (sqrt(beta_min^2 + 2 beta_d log1p(sigma^2)) - beta_min) / beta_d.
double vp_sigma_inv(double sigma, VpParams p);

}  // namespace schedules
}  // namespace geosample
