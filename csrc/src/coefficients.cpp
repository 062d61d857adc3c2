// Solver coefficients: float64 functions of the grid, the same maths as
// geosample/solvers/adams.py and geosample/solvers/exponential.py.
#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>
#include <string>

#include "geosample/schedules.hpp"
#include "geosample/solvers.hpp"

namespace geosample {
namespace solvers {
namespace {

constexpr int kGaussNodes = 64;  // Gauss-Legendre nodes per DEIS step (exact to float64 here)

void check_step(const std::vector<double>& sigmas, int i, int order, int max_order) {
    if (order < 1 || order > max_order)
        throw std::invalid_argument("order must be in [1, " + std::to_string(max_order) + "], got " +
                                    std::to_string(order));
    if (i < order - 1 || i + 1 >= static_cast<int>(sigmas.size()))
        throw std::invalid_argument("step " + std::to_string(i) + " of order " + std::to_string(order) +
                                    " needs sigmas[" + std::to_string(i - order + 1) + " .. " + std::to_string(i + 1) +
                                    "], got " + std::to_string(sigmas.size()) + " sigmas");
    for (int k = i - order + 1; k <= i + 1; ++k)
        if (!(sigmas[k] > 0) || !std::isfinite(sigmas[k]))
            throw std::invalid_argument("sigmas used by a step must be finite and > 0");
}

// Vectors over the newest denoiser outputs: v[k] is the weight of the k-th one. The formulas are
// evaluated on unit vectors, exactly as the Python reference does with np.eye.
using Vec = std::array<double, 5>;

Vec unit(int k) {
    Vec v{};
    v[k] = 1.0;
    return v;
}
Vec operator+(Vec a, const Vec& b) { for (std::size_t k = 0; k < a.size(); ++k) a[k] += b[k]; return a; }
Vec operator-(Vec a, const Vec& b) { for (std::size_t k = 0; k < a.size(); ++k) a[k] -= b[k]; return a; }
Vec operator*(double c, Vec a) { for (double& v : a) v *= c; return a; }
Vec operator/(Vec a, double c) { for (double& v : a) v /= c; return a; }

// lambda = -log sigma at steps i, i-1, ..., i-count+1 (newest first).
std::vector<double> lams(const std::vector<double>& sigmas, int i, int count) {
    std::vector<double> lam(count);
    for (int k = 0; k < count; ++k) lam[k] = -std::log(sigmas[i - k]);
    return lam;
}

std::vector<double> take(const Vec& v, int from, int count) {
    return std::vector<double>(v.begin() + from, v.begin() + from + count);
}

// Solves A y = g (size <= 3) by Gaussian elimination with partial pivoting.
std::vector<double> solve(std::vector<std::vector<double>> a, std::vector<double> g) {
    const int n = static_cast<int>(g.size());
    for (int c = 0; c < n; ++c) {
        int p = c;
        for (int r = c + 1; r < n; ++r)
            if (std::fabs(a[r][c]) > std::fabs(a[p][c])) p = r;
        if (a[p][c] == 0) throw std::invalid_argument("unipc: singular system (repeated sigmas)");
        std::swap(a[c], a[p]);
        std::swap(g[c], g[p]);
        for (int r = c + 1; r < n; ++r) {
            const double f = a[r][c] / a[c][c];
            for (int q = c; q < n; ++q) a[r][q] -= f * a[c][q];
            g[r] -= f * g[c];
        }
    }
    for (int c = n - 1; c >= 0; --c) {
        for (int q = c + 1; q < n; ++q) g[c] -= a[c][q] * g[q];
        g[c] /= a[c][c];
    }
    return g;
}

}  // namespace

std::vector<double> ipndm_coefficients(const std::vector<double>& sigmas, int i, int order) {
    static const double ab[4][4] = {{1.0}, {3.0 / 2, -1.0 / 2}, {23.0 / 12, -16.0 / 12, 5.0 / 12},
                                    {55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24}};
    check_step(sigmas, i, order, 4);
    const double h = sigmas[i + 1] - sigmas[i];
    std::vector<double> c(order);
    for (int k = 0; k < order; ++k) c[k] = h * ab[order - 1][k];
    return c;
}

std::vector<double> ipndm_v_coefficients(const std::vector<double>& sigmas, int i, int order) {
    check_step(sigmas, i, order, 4);
    const double h = sigmas[i + 1] - sigmas[i];
    if (order == 1) return {h};
    const double g1 = sigmas[i] - sigmas[i - 1];
    const double q1 = h / g1;
    std::vector<double> c{1 + q1 / 2, -q1 / 2};
    if (order >= 3) {
        const double g2 = sigmas[i - 1] - sigmas[i - 2];
        const double r2 = g1 / g2;
        const double a = (1 - h / (3 * (h + g1)) * (h * (h + g1)) / (g1 * (g1 + g2))) / 2;
        c = {c[0] + a, c[1] - (1 + r2) * a, a * r2};
        if (order == 4) {
            const double g3 = sigmas[i - 2] - sigmas[i - 3];
            const double w = g1 * (g1 + g2) / (g2 * (g2 + g3));
            const double b = ((1 - h / (3 * (h + g1))) / 2 + (1 - h / (2 * (h + g1))) * h / (6 * (h + g1 + g2))) *
                             (h * (h + g1) * (h + g1 + g2)) / (g1 * (g1 + g2) * (g1 + g2 + g3));
            c = {c[0] + b, c[1] - (1 + r2 + w) * b, c[2] + (r2 + w * (1 + g2 / g3)) * b, -b * w * r2};
        }
    }
    for (double& v : c) v *= h;
    return c;
}

void gauss_legendre(int n, std::vector<double>& nodes, std::vector<double>& weights) {
    if (n < 1) throw std::invalid_argument("gauss_legendre needs n >= 1, got " + std::to_string(n));
    const double pi = std::acos(-1.0);
    nodes.assign(n, 0.0);
    weights.assign(n, 0.0);
    for (int k = 0; k < (n + 1) / 2; ++k) {
        double x = std::cos(pi * (k + 0.75) / (n + 0.5)), dp = 0.0;  // k-th largest root, Tricomi guess
        for (int it = 0; it < 100; ++it) {
            double p0 = 1.0, p1 = x;  // P_n(x) by the three-term recurrence, then P_n'(x)
            for (int j = 2; j <= n; ++j) {
                const double p2 = ((2 * j - 1) * x * p1 - (j - 1) * p0) / j;
                p0 = p1;
                p1 = p2;
            }
            dp = n * (x * p1 - p0) / (x * x - 1);
            const double dx = p1 / dp;
            x -= dx;
            if (std::fabs(dx) < 1e-16) break;
        }
        nodes[k] = -x;
        nodes[n - 1 - k] = x;
        weights[k] = weights[n - 1 - k] = 2 / ((1 - x * x) * dp * dp);
    }
}

std::vector<std::vector<double>> deis_tab_coefficients(const std::vector<double>& sigmas, int max_order) {
    if (max_order < 1 || max_order > 4)
        throw std::invalid_argument("max_order must be in [1, 4], got " + std::to_string(max_order));
    if (sigmas.size() < 2) throw std::invalid_argument("deis needs at least 2 sigmas");
    for (double s : sigmas)
        if (!(s > 0) || !std::isfinite(s)) throw std::invalid_argument("deis sigmas must be finite and > 0");
    const schedules::VpParams p = schedules::vp_params();
    std::vector<double> t(sigmas.size()), u, w;
    for (std::size_t i = 0; i < sigmas.size(); ++i) t[i] = schedules::vp_sigma_inv(sigmas[i], p);
    gauss_legendre(kGaussNodes, u, w);
    std::vector<std::vector<double>> out;
    for (int i = 0; i + 1 < static_cast<int>(t.size()); ++i) {
        const int order = std::min(i + 1, max_order);
        const double a = t[i], b = t[i + 1];
        std::vector<double> c(order, 0.0);
        for (int q = 0; q < kGaussNodes; ++q) {
            const double tau = 0.5 * (b - a) * u[q] + 0.5 * (a + b);
            const double g = 0.5 * p.beta_d * tau * tau + p.beta_min * tau;
            const double dsigma = (p.beta_d * tau + p.beta_min) * std::exp(g) / (2 * std::sqrt(std::expm1(g)));
            const double weight = 0.5 * (b - a) * w[q] * dsigma;
            for (int j = 0; j < order; ++j) {
                double basis = 1.0;  // Lagrange basis L_j on the nodes t_i, t_{i-1}, ...
                for (int l = 0; l < order; ++l)
                    if (l != j) basis *= (tau - t[i - l]) / (t[i - j] - t[i - l]);
                c[j] += weight * basis;
            }
        }
        out.push_back(c);
    }
    return out;
}

std::vector<double> dpmpp_coefficients(const std::vector<double>& sigmas, int i, int order) {
    check_step(sigmas, i, order, 3);
    const std::vector<double> lam = lams(sigmas, i, order);
    const double h = -std::log(sigmas[i + 1]) - lam[0];
    const double phi1 = std::expm1(-h);
    const Vec m0 = unit(0), m1 = unit(1), m2 = unit(2);
    if (order == 1) return take(-phi1 * m0, 0, 1);
    const double r0 = (lam[0] - lam[1]) / h;
    const Vec d1_0 = (m0 - m1) / r0;
    if (order == 2) return take(-phi1 * m0 - 0.5 * phi1 * d1_0, 0, 2);
    const double r1 = (lam[1] - lam[2]) / h;
    const Vec d1_1 = (m1 - m2) / r1;
    const Vec d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1);
    const Vec d2 = (d1_0 - d1_1) / (r0 + r1);
    const double phi2 = phi1 / h + 1.0;
    const double phi3 = phi2 / h - 0.5;
    return take(-phi1 * m0 + phi2 * d1 - phi3 * d2, 0, 3);
}

UniPCCoefficients unipc_coefficients(const std::vector<double>& sigmas, int i, int order, const std::string& variant) {
    check_step(sigmas, i, order, 3);
    if (variant != "bh1" && variant != "bh2")
        throw std::invalid_argument("unipc variant must be 'bh1' or 'bh2', got '" + variant + "'");
    const std::vector<double> lam = lams(sigmas, i, order);
    const double h = -std::log(sigmas[i + 1]) - lam[0];
    const double hh = -h;
    const double h_phi_1 = std::expm1(hh);
    const double b_h = variant == "bh1" ? hh : std::expm1(hh);
    std::vector<double> rks;
    for (int k = 1; k < order; ++k) rks.push_back((lam[k] - lam[0]) / h);
    rks.push_back(1.0);
    std::vector<double> g;
    double h_phi_k = h_phi_1 / hh - 1.0, fact = 1.0;
    for (int p = 1; p <= order; ++p) {
        g.push_back(h_phi_k * fact / b_h);
        fact *= p + 1;
        h_phi_k = h_phi_k / hh - 1.0 / fact;
    }
    std::vector<std::vector<double>> R(order, std::vector<double>(order));
    for (int p = 0; p < order; ++p)
        for (int q = 0; q < order; ++q) R[p][q] = std::pow(rks[q], p);

    // unit(0) is the new output m_t, unit(1 + k) the k-th newest m_k.
    std::vector<Vec> d1s;
    for (int k = 1; k < order; ++k) d1s.push_back((unit(1 + k) - unit(1)) / rks[k - 1]);
    const Vec base = -h_phi_1 * unit(1);
    Vec pred = base;
    if (order > 1) {
        std::vector<double> rho_p{0.5};
        if (order > 2) {
            std::vector<std::vector<double>> r(order - 1, std::vector<double>(order - 1));
            for (int p = 0; p < order - 1; ++p)
                for (int q = 0; q < order - 1; ++q) r[p][q] = R[p][q];
            rho_p = solve(r, std::vector<double>(g.begin(), g.end() - 1));
        }
        Vec acc{};
        for (int k = 0; k < order - 1; ++k) acc = acc + rho_p[k] * d1s[k];
        pred = base - b_h * acc;
    }
    const std::vector<double> rho_c = order == 1 ? std::vector<double>{0.5} : solve(R, g);
    Vec acc{};
    for (int k = 0; k < order - 1; ++k) acc = acc + rho_c[k] * d1s[k];
    const Vec corr = base - b_h * (acc + rho_c[order - 1] * (unit(0) - unit(1)));
    return {take(pred, 1, order), take(corr, 0, order + 1)};
}

int step_order(int i, int steps, int max_order, bool lower_order_final) {
    if (i + 1 < max_order) return i + 1;
    return lower_order_final ? std::min(max_order, steps - i) : max_order;
}

}  // namespace solvers
}  // namespace geosample
