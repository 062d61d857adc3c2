// pybind11 module geosample._C: the C++ core for Python (numpy in, numpy / lists out).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "geosample/geosample.hpp"

namespace py = pybind11;
namespace gs = geosample;

namespace {

using F64 = py::array_t<double, py::array::c_style | py::array::forcecast>;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::array_t<double> to_numpy(const std::vector<double>& v) {
    py::array_t<double> out(v.size());
    std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(double));
    return out;
}

const double* square(const F64& cost, int& n) {
    if (cost.ndim() != 2 || cost.shape(0) != cost.shape(1))
        throw py::value_error("cost must be a square 2-D array, got ndim=" + std::to_string(cost.ndim()));
    n = static_cast<int>(cost.shape(0));
    return cost.data();
}

// Runs a solver with a Python denoiser(x: float32 array shaped like noise, sigma: float) -> array.
py::tuple sample(const py::function& denoiser, const F32& noise, const std::vector<double>& sigmas,
                 const std::string& solver, bool afs, int max_order, bool lower_order_final,
                 const std::string& variant, double r) {
    std::vector<py::ssize_t> shape(noise.shape(), noise.shape() + noise.ndim());
    std::vector<float> x(noise.data(), noise.data() + noise.size());
    gs::solvers::Options options;
    options.afs = afs;
    options.max_order = max_order;
    options.lower_order_final = lower_order_final;
    options.variant = variant;
    options.r = r;
    auto call = [&](const float* in, double sigma, float* out, std::size_t n) {
        py::array_t<float> xin(shape);
        std::memcpy(xin.mutable_data(), in, n * sizeof(float));
        F32 res = F32::ensure(denoiser(xin, sigma));
        if (!res || static_cast<std::size_t>(res.size()) != n)
            throw py::value_error("denoiser must return an array with " + std::to_string(n) + " elements");
        std::memcpy(out, res.data(), n * sizeof(float));
    };
    const int nfe = gs::solvers::sample(solver, call, x, sigmas, options);
    py::array_t<float> out(shape);
    std::memcpy(out.mutable_data(), x.data(), x.size() * sizeof(float));
    return py::make_tuple(out, nfe);
}

// GITS cost matrix of x [T, B, D] and den [T-1, B, D] (both float32 or both float64), grid [T].
template <class S>
py::array_t<double> cost_matrix_typed(const py::array& x_in, const py::array& den_in, const F64& grid,
                                      const std::string& metric, int threads) {
    using A = py::array_t<S, py::array::c_style | py::array::forcecast>;
    const A x = A::ensure(x_in), den = A::ensure(den_in);
    if (x.ndim() != 3 || den.ndim() != 3 || den.shape(0) + 1 != x.shape(0) || den.shape(1) != x.shape(1) ||
        den.shape(2) != x.shape(2))
        throw py::value_error("cost_matrix needs x [T, B, D] and den [T-1, B, D]");
    const int T = static_cast<int>(x.shape(0));
    if (grid.ndim() != 1 || grid.shape(0) != T) throw py::value_error("grid must hold T = x.shape[0] sigmas");
    const auto m = gs::gits::metric_from_name(metric);
    py::array_t<double> out({T, T});
    const S *xp = x.data(), *dp = den.data();
    const double* gp = grid.data();
    double* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        gs::gits::cost_matrix(xp, dp, gp, T, x.shape(1), x.shape(2), m, op, threads);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "geosample C++ core: schedules, GITS dynamic programme, solver coefficients and sample loop";
    m.attr("__version__") = GEOSAMPLE_VERSION;

    m.def("polynomial", &gs::schedules::polynomial, py::arg("steps"), py::arg("sigma_min") = 0.002,
          py::arg("sigma_max") = 80.0, py::arg("rho") = 7.0, "EDM schedule as a list of steps + 1 floats");
    m.def("logsnr", &gs::schedules::logsnr, py::arg("steps"), py::arg("sigma_min") = 0.002,
          py::arg("sigma_max") = 80.0, "log-uniform schedule as a list of steps + 1 floats");
    m.def("time_uniform", &gs::schedules::time_uniform, py::arg("steps"), py::arg("sigma_min") = 0.002,
          py::arg("sigma_max") = 80.0, py::arg("rho") = 1.0, "VP-time schedule as a list of steps + 1 floats");

    m.def("solve_dp", [](const F64& cost, int steps, double gamma) {
              int n;
              const double* c = square(cost, n);
              return gs::gits::solve_dp(c, n, steps, gamma);
          }, py::arg("cost"), py::arg("steps"), py::arg("gamma") = 1.15,
          "GITS DP on an n x n cost: the steps + 1 grid indices from 0 to n - 1");
    m.def("solve_dp_all", [](const F64& cost, int max_steps, double gamma) {
              int n;
              const double* c = square(cost, n);
              return gs::gits::solve_dp_all(c, n, max_steps, gamma);
          }, py::arg("cost"), py::arg("max_steps"), py::arg("gamma") = 1.15,
          "GITS paths for every step count 1..max_steps from one DP table");

    m.def("cost_matrix", [](const py::array& x, const py::array& den, const F64& grid, const std::string& metric,
                            int threads) {
              if (x.dtype().is(py::dtype::of<double>()) && den.dtype().is(py::dtype::of<double>()))
                  return cost_matrix_typed<double>(x, den, grid, metric, threads);
              return cost_matrix_typed<float>(x, den, grid, metric, threads);
          }, py::arg("x"), py::arg("den"), py::arg("grid"), py::arg("metric") = "dev", py::arg("threads") = 0,
          "GITS cost matrix [T, T] (batch mean, +inf for i >= j) of x [T, B, D] and den [T-1, B, D]");

    m.def("ipndm_coefficients", &gs::solvers::ipndm_coefficients, py::arg("sigmas"), py::arg("i"), py::arg("order"));
    m.def("ipndm_v_coefficients", &gs::solvers::ipndm_v_coefficients, py::arg("sigmas"), py::arg("i"),
          py::arg("order"));
    m.def("deis_tab_coefficients", &gs::solvers::deis_tab_coefficients, py::arg("sigmas"), py::arg("max_order") = 4);
    m.def("dpmpp_coefficients", [](const std::vector<double>& s, int i, int order) {
              return to_numpy(gs::solvers::dpmpp_coefficients(s, i, order));
          }, py::arg("sigmas"), py::arg("i"), py::arg("order"));
    m.def("unipc_coefficients", [](const std::vector<double>& s, int i, int order, const std::string& variant) {
              const auto c = gs::solvers::unipc_coefficients(s, i, order, variant);
              return py::make_tuple(to_numpy(c.predictor), to_numpy(c.corrector));
          }, py::arg("sigmas"), py::arg("i"), py::arg("order"), py::arg("variant") = "bh2");
    m.def("step_order", &gs::solvers::step_order, py::arg("i"), py::arg("steps"), py::arg("max_order"),
          py::arg("lower_order_final"));
    m.def("gauss_legendre", [](int n) {
              std::vector<double> x, w;
              gs::solvers::gauss_legendre(n, x, w);
              return py::make_tuple(to_numpy(x), to_numpy(w));
          }, py::arg("n"));
    m.def("solver_names", &gs::solvers::solver_names);
    m.def("evals_per_step", &gs::solvers::evals_per_step, py::arg("solver"));
    m.def("sample", &sample, py::arg("denoiser"), py::arg("noise"), py::arg("sigmas"), py::arg("solver") = "ipndm",
          py::arg("afs") = false, py::arg("max_order") = 0, py::arg("lower_order_final") = true,
          py::arg("variant") = "bh2", py::arg("r") = 0.5,
          "Runs a solver from sigmas[0] * noise (float32); returns (sample, nfe)");
}
