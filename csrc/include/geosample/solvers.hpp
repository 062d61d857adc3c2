// Deterministic ODE solvers for dx/dsigma = (x - D(x, sigma)) / sigma over float32 buffers.
//
// Every update is a linear combination x_out = a x + sum_k b_k H_k of float buffers with float64
// coefficients that depend only on the grid; the coefficient functions below are the same maths
// as geosample/solvers/{adams,exponential}.py. `sample` runs any solver with a caller's denoiser
// and has the semantics of geosample.sample (AFS, trailing-zero final denoise, NFE count).
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace geosample {
namespace solvers {

// ---- coefficients (sigmas: the ODE grid, positive and strictly decreasing) ----

// iPNDM: Adams-Bashforth weights (newest direction first) times h = sigma_{i+1} - sigma_i. order 1..4.
std::vector<double> ipndm_coefficients(const std::vector<double>& sigmas, int i, int order);

// iPNDM_v: the reference's variable-step Adams-Bashforth weights times h. order 1..4, order <= i+1.
std::vector<double> ipndm_v_coefficients(const std::vector<double>& sigmas, int i, int order);

// DEIS-tAB: c_ij = int_{t_i}^{t_{i+1}} sigma'(tau) L_j(tau) dtau for every step i (order min(i+1, max_order)),
// t the VP time of the default VP-SDE, 64-node Gauss-Legendre quadrature.
std::vector<std::vector<double>> deis_tab_coefficients(const std::vector<double>& sigmas, int max_order = 4);

// Gauss-Legendre nodes (ascending in [-1, 1]) and weights, by Newton iteration on P_n.
void gauss_legendre(int n, std::vector<double>& nodes, std::vector<double>& weights);

// Multistep DPM-Solver++ of order 1..3: x_next = (sigma_{i+1}/sigma_i) x + sum_k b_k m_k (newest first).
std::vector<double> dpmpp_coefficients(const std::vector<double>& sigmas, int i, int order);

// UniPC (variant "bh1" or "bh2"): predictor b over m_0..m_{order-1}; corrector b over m_t, m_0..m_{order-1}.
struct UniPCCoefficients {
    std::vector<double> predictor;
    std::vector<double> corrector;
};
UniPCCoefficients unipc_coefficients(const std::vector<double>& sigmas, int i, int order,
                                     const std::string& variant = "bh2");

// Order schedule of the multistep exponential solvers: i+1 while warming up, then max_order,
// lowered to the steps left at the end when lower_order_final (1, 2, 3, ..., 3, 2, 1).
int step_order(int i, int steps, int max_order, bool lower_order_final);

// ---- buffers ----

// out[j] = a x[j] + sum_k b[k] H[k][j] for j < n, accumulated in double. x may be null (a ignored);
// out may alias x or any H[k].
void lincomb(float* out, double a, const float* x, const double* b, const float* const* H, int k, std::size_t n);

// ---- sampling ----

// D(x, sigma) -> denoised over the whole flattened batch (n floats, one sigma for the batch).
using Denoiser = std::function<void(const float* x, double sigma, float* denoised, std::size_t n)>;

struct Options {
    bool afs = false;               // analytic first step: D = x (1 - sigma / sqrt(1 + sigma^2)), no call
    int max_order = 0;              // 0: the solver's default (4 for ipndm/ipndm_v/deis, 3 for dpmpp/unipc)
    bool lower_order_final = true;  // dpmpp, unipc
    std::string variant = "bh2";    // unipc
    double r = 0.5;                 // dpm2 midpoint sigma_mid = sigma_next^r sigma^(1-r)
};

// "euler", "heun", "dpm2", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc".
const std::vector<std::string>& solver_names();

// Denoiser calls per ODE step (2 for heun and dpm2, else 1).
int evals_per_step(const std::string& solver);

// Integrates x (in: the noise, out: the sample) from sigmas[0] * noise along sigmas; a trailing 0
// means a final full denoise x = D(x, sigmas[-2]). Returns the number of denoiser calls (NFE).
// Throws std::invalid_argument on a bad solver, option or grid, std::runtime_error on a non-finite result.
int sample(const std::string& solver, const Denoiser& denoiser, std::vector<float>& x,
           const std::vector<double>& sigmas, const Options& options = Options());

}  // namespace solvers
}  // namespace geosample
