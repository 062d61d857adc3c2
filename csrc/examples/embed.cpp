// Embeds the geosample core: a schedule, the GITS DP on a toy cost, and sampling a 1-D Gaussian.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include <geosample/geosample.hpp>

int main() {
    namespace gs = geosample;
    const std::vector<double> grid = gs::schedules::polynomial(60);  // the default GITS fine grid
    std::printf("polynomial(60): %g ... %g (%zu points)\n", grid.front(), grid.back(), grid.size());

    // Toy cost: squared log-sigma jump, so the DP spreads the steps evenly in log sigma.
    const int n = static_cast<int>(grid.size());
    std::vector<double> cost(n * n, 0.0);
    for (int j = 0; j < n; ++j)
        for (int m = j + 1; m < n; ++m) cost[j * n + m] = std::pow(std::log(grid[j] / grid[m]), 2);
    const std::vector<int> idx = gs::gits::solve_dp(cost.data(), n, 5, 1.15);
    const auto t0 = std::chrono::steady_clock::now();
    const int reps = 1000;
    for (int r = 0; r < reps; ++r) gs::gits::solve_dp(cost.data(), n, 10, 1.15);
    const std::chrono::duration<double, std::micro> dt = std::chrono::steady_clock::now() - t0;
    std::printf("solve_dp(%d points, 10 steps): %.2f us per call\n", n, dt.count() / reps);
    std::vector<double> sigmas;
    std::printf("GITS indices:");
    for (int i : idx) {
        std::printf(" %d", i);
        sigmas.push_back(grid[i]);
    }
    std::printf("\n");

    // Data N(0, v): D(x, sigma) = v / (v + sigma^2) x; the exact sample is sqrt((v + smin^2) / (v + smax^2)) x_T.
    const double v = 0.25;
    auto denoiser = [v](const float* x, double sigma, float* out, std::size_t count) {
        for (std::size_t j = 0; j < count; ++j) out[j] = static_cast<float>(v / (v + sigma * sigma) * x[j]);
    };
    const std::vector<double> fine = gs::schedules::polynomial(20);
    for (const char* solver : {"euler", "heun", "ipndm", "dpmpp", "unipc"}) {
        std::vector<float> x{1.0f};  // the noise; x_T = sigma_max * noise
        const int nfe = gs::solvers::sample(solver, denoiser, x, fine);
        const double exact = std::sqrt((v + fine.back() * fine.back()) / (v + fine[0] * fine[0])) * fine[0];
        std::printf("%-6s nfe=%2d x0=%.6f exact=%.6f\n", solver, nfe, x[0], exact);
    }
    return 0;
}
