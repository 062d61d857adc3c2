#include "geosample/schedules.hpp"

#include <cmath>
#include <stdexcept>
#include <string>

namespace geosample {
namespace schedules {
namespace {

void check_steps(int steps) {
    if (steps < 1) throw std::invalid_argument("steps must be >= 1, got " + std::to_string(steps));
}

void check_range(double sigma_min, double sigma_max) {
    if (!std::isfinite(sigma_min) || !std::isfinite(sigma_max))
        throw std::invalid_argument("sigma_min and sigma_max must be finite");
    if (sigma_min <= 0) throw std::invalid_argument("sigma_min must be > 0, got " + std::to_string(sigma_min));
    if (sigma_min >= sigma_max)
        throw std::invalid_argument("sigma_min must be < sigma_max, got sigma_min=" + std::to_string(sigma_min) +
                                    ", sigma_max=" + std::to_string(sigma_max));
}

void check_rho(double rho) {
    if (!std::isfinite(rho) || rho <= 0)
        throw std::invalid_argument("rho must be a finite number > 0, got " + std::to_string(rho));
}

// sigma_i = f(i / steps) for i = 0..steps, with both ends pinned.
template <class F>
std::vector<double> ramp_map(int steps, double first, double last, F f) {
    std::vector<double> s(steps + 1);
    for (int i = 0; i <= steps; ++i) s[i] = f(static_cast<double>(i) / steps);
    s.front() = first;
    s.back() = last;
    return s;
}

}  // namespace

std::vector<double> polynomial(int steps, double sigma_min, double sigma_max, double rho) {
    check_steps(steps);
    check_range(sigma_min, sigma_max);
    check_rho(rho);
    const double a = std::pow(sigma_max, 1 / rho), b = std::pow(sigma_min, 1 / rho);
    return ramp_map(steps, sigma_max, sigma_min, [&](double u) { return std::pow(a + u * (b - a), rho); });
}

std::vector<double> logsnr(int steps, double sigma_min, double sigma_max) {
    check_steps(steps);
    check_range(sigma_min, sigma_max);
    const double lo = std::log(sigma_min), hi = std::log(sigma_max);
    return ramp_map(steps, sigma_max, sigma_min, [&](double u) { return std::exp(hi + u * (lo - hi)); });
}

VpParams vp_params(double sigma_min, double sigma_max, double eps) {
    check_range(sigma_min, sigma_max);
    const double l0 = std::log1p(sigma_min * sigma_min), l1 = std::log1p(sigma_max * sigma_max);
    const double beta_d = 2 * (l0 / eps - l1) / (eps - 1);
    return {beta_d, l1 - 0.5 * beta_d};
}

double vp_sigma(double t, VpParams p) {
    return std::sqrt(std::expm1(0.5 * p.beta_d * t * t + p.beta_min * t));
}

double vp_sigma_inv(double sigma, VpParams p) {
    return (std::sqrt(p.beta_min * p.beta_min + 2 * p.beta_d * std::log1p(sigma * sigma)) - p.beta_min) / p.beta_d;
}

std::vector<double> time_uniform(int steps, double sigma_min, double sigma_max, double rho) {
    check_steps(steps);
    check_range(sigma_min, sigma_max);
    check_rho(rho);
    const VpParams p = vp_params(sigma_min, sigma_max);
    const double e = std::pow(kVpEps, 1 / rho) - 1;
    return ramp_map(steps, sigma_max, sigma_min,
                    [&](double u) { return vp_sigma(std::pow(1 + u * e, rho), p); });
}

}  // namespace schedules
}  // namespace geosample
