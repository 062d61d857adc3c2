// Plain-assert tests of the C++ core (run by ctest; the Python tests compare it to the reference).
#undef NDEBUG
#include <cassert>
#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <vector>

#include "geosample/geosample.hpp"

namespace gs = geosample;

template <class F>
bool throws_invalid(F f) {
    try {
        f();
    } catch (const std::invalid_argument&) {
        return true;
    }
    return false;
}

void test_schedules() {
    for (auto s : {gs::schedules::polynomial(18), gs::schedules::logsnr(18), gs::schedules::time_uniform(18)}) {
        assert(s.size() == 19 && s.front() == 80.0 && s.back() == 0.002);
        for (std::size_t i = 1; i < s.size(); ++i) assert(s[i] < s[i - 1]);
    }
    const auto l = gs::schedules::logsnr(2, 1.0, 100.0);
    assert(std::fabs(l[1] - 10.0) < 1e-12);
    assert(throws_invalid([] { gs::schedules::polynomial(0); }));
    assert(throws_invalid([] { gs::schedules::polynomial(5, 0.0, 80.0); }));
    assert(throws_invalid([] { gs::schedules::logsnr(5, 80.0, 80.0); }));
    assert(throws_invalid([] { gs::schedules::time_uniform(5, 0.002, 80.0, -1.0); }));
}

void test_dp() {
    // Cost = squared jump length on 0..n-1: the best k-step path is (near) uniform.
    const int n = 9;
    std::vector<double> c(n * n);
    for (int j = 0; j < n; ++j)
        for (int m = 0; m < n; ++m) c[j * n + m] = double(m - j) * (m - j);
    const auto p = gs::gits::solve_dp(c.data(), n, 4, 1.0);
    assert((p == std::vector<int>{0, 2, 4, 6, 8}));
    const auto all = gs::gits::solve_dp_all(c.data(), n, n - 1, 1.0);
    for (int k = 1; k <= n - 1; ++k) {
        assert(int(all[k - 1].size()) == k + 1 && all[k - 1].front() == 0 && all[k - 1].back() == n - 1);
        assert(all[k - 1] == gs::gits::solve_dp(c.data(), n, k, 1.0));
    }
    std::vector<double> zero(n * n, 0.0);  // all ties: smallest m first
    assert((gs::gits::solve_dp(zero.data(), n, 3, 1.0) == std::vector<int>{0, 1, 2, 8}));
    assert(throws_invalid([&] { gs::gits::solve_dp(c.data(), n, n, 1.0); }));
    assert(throws_invalid([&] { gs::gits::solve_dp(c.data(), n, 2, 0.0); }));
    c[1] = std::nan("");
    assert(throws_invalid([&] { gs::gits::solve_dp(c.data(), n, 2, 1.0); }));
}

void test_coefficients() {
    std::vector<double> x, w;
    gs::solvers::gauss_legendre(64, x, w);
    double sw = 0, sx2 = 0;
    for (int q = 0; q < 64; ++q) {
        sw += w[q];
        sx2 += w[q] * x[q] * x[q];
    }
    assert(std::fabs(sw - 2) < 1e-13 && std::fabs(sx2 - 2.0 / 3) < 1e-13);
    const std::vector<double> u{5, 4, 3, 2, 1};  // uniform steps: iPNDM_v == iPNDM up to order 3
    for (int order = 1; order <= 3; ++order) {
        const auto a = gs::solvers::ipndm_coefficients(u, 3, order), b = gs::solvers::ipndm_v_coefficients(u, 3, order);
        for (int k = 0; k < order; ++k) assert(std::fabs(a[k] - b[k]) < 1e-12);
    }
    const auto s = gs::schedules::polynomial(8);
    for (int i = 0; i < 8; ++i) {
        for (int order = 1; order <= std::min(i + 1, 3); ++order) {
            double sum = 0;  // every exponential update reproduces a constant denoiser exactly
            for (double b : gs::solvers::dpmpp_coefficients(s, i, order)) sum += b;
            assert(std::fabs(sum + s[i + 1] / s[i] - 1) < 1e-12);
            const auto uc = gs::solvers::unipc_coefficients(s, i, order);
            double sp = 0, sc = 0;
            for (double b : uc.predictor) sp += b;
            for (double b : uc.corrector) sc += b;
            assert(std::fabs(sp + s[i + 1] / s[i] - 1) < 1e-12 && std::fabs(sc + s[i + 1] / s[i] - 1) < 1e-12);
        }
    }
    const auto deis = gs::solvers::deis_tab_coefficients(s, 4);
    for (int i = 0; i < 8; ++i) {
        double sum = 0;  // Lagrange bases sum to 1: the weights integrate d sigma over the step
        for (double c : deis[i]) sum += c;
        assert(std::fabs(sum - (s[i + 1] - s[i])) < 1e-9 * s[i]);
    }
}

void test_sample() {
    // Data N(0, v): D(x, sigma) = v / (v + sigma^2) x; the exact flow is x(sigma) = sqrt((v + sigma^2) / (v + smax^2)) x_T.
    const double v = 0.25;
    const gs::solvers::Denoiser d = [v](const float* x, double sigma, float* out, std::size_t n) {
        for (std::size_t j = 0; j < n; ++j) out[j] = float(v / (v + sigma * sigma) * x[j]);
    };
    auto sigmas = gs::schedules::polynomial(40, 0.002, 80.0);
    for (const auto& name : gs::solvers::solver_names()) {
        std::vector<float> x{1.0f, -0.5f};
        const int nfe = gs::solvers::sample(name, d, x, sigmas);
        assert(nfe == 40 * gs::solvers::evals_per_step(name));
        const double want = std::sqrt((v + 0.002 * 0.002) / (v + 80.0 * 80.0)) * 80.0;
        const double tol = name == "euler" ? 0.05 : 6e-3;  // order 1 vs order >= 2 on 40 steps
        assert(std::fabs(x[0] - want) < tol && std::fabs(x[1] + 0.5 * want) < tol);
    }
    std::vector<double> with_zero = gs::schedules::polynomial(5);
    with_zero.push_back(0.0);
    std::vector<float> x{1.0f};
    gs::solvers::Options o;
    o.afs = true;
    assert(gs::solvers::sample("heun", d, x, with_zero, o) == 2 * 5 - 1 + 1);
    assert(throws_invalid([&] { gs::solvers::sample("nope", d, x, with_zero); }));
    assert(throws_invalid([&] { gs::solvers::sample("euler", d, x, {1.0, 2.0}); }));
}

void test_cost_matrix() {
    // A straight teacher, x_t = a + G_t n with D(x_t) = a: every Euler jump lands exactly on the
    // teacher (l1 = l2 = 0) and every point lies on the chord (dev = 0, up to the sqrt(eps) |r|
    // floor of |P r|^2 = r.r - (r.c)^2 / c.c, with |r| <= 80 * sqrt(D) here).
    const int T = 7, B = 3, D = 37;
    const auto grid = gs::schedules::polynomial(T - 1);
    std::vector<double> x(T * B * D), den((T - 1) * B * D);
    for (int t = 0; t < T; ++t)
        for (int b = 0; b < B; ++b)
            for (int k = 0; k < D; ++k) {
                const double a = std::sin(0.3 * k + b), n = std::cos(1.7 * k - b);
                x[(t * B + b) * D + k] = a + grid[t] * n;
                if (t + 1 < T) den[(t * B + b) * D + k] = a;
            }
    std::vector<double> out(T * T);
    for (auto m : {gs::gits::Metric::l1, gs::gits::Metric::l2, gs::gits::Metric::dev}) {
        gs::gits::cost_matrix(x.data(), den.data(), grid.data(), T, B, D, m, out.data(), 2);
        const double tol = m == gs::gits::Metric::dev ? 3e-8 * 80 * std::sqrt(D) : 1e-9;
        for (int i = 0; i < T; ++i)
            for (int j = 0; j < T; ++j) assert(i < j ? std::fabs(out[i * T + j]) < tol : std::isinf(out[i * T + j]));
    }
    // Bending it makes jumps miss: positive l2 cost, growing with the jump length from point 0.
    for (int b = 0; b < B; ++b) x[(3 * B + b) * D] += 1.0;
    gs::gits::cost_matrix(x.data(), den.data(), grid.data(), T, B, D, gs::gits::Metric::l2, out.data(), 1);
    assert(out[0 * T + 3] > 0.99 && out[0 * T + 1] < 1e-9);
    std::vector<float> xf(x.begin(), x.end()), df(den.begin(), den.end());
    std::vector<double> outf(T * T);
    gs::gits::cost_matrix(xf.data(), df.data(), grid.data(), T, B, D, gs::gits::Metric::l2, outf.data(), 0);
    assert(std::fabs(outf[3] - out[3]) < 1e-4);
    assert(gs::gits::metric_from_name("dev") == gs::gits::Metric::dev);
    assert(throws_invalid([] { gs::gits::metric_from_name("l3"); }));
    assert(throws_invalid([&] { gs::gits::cost_matrix(x.data(), den.data(), grid.data(), 1, B, D,
                                                      gs::gits::Metric::l2, out.data()); }));
    std::vector<double> bad_grid(grid.begin(), grid.end());
    bad_grid[2] = 0.0;
    assert(throws_invalid([&] { gs::gits::cost_matrix(x.data(), den.data(), bad_grid.data(), T, B, D,
                                                      gs::gits::Metric::dev, out.data()); }));
}

int main() {
    test_schedules();
    test_dp();
    test_cost_matrix();
    test_coefficients();
    test_sample();
    std::puts("test_core: all passed");
    return 0;
}
