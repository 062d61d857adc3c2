// The solver loops of geosample.sample over float32 buffers (see geosample/solvers/*.py).
#include <algorithm>
#include <cmath>
#include <deque>
#include <stdexcept>
#include <string>

#include "geosample/solvers.hpp"

namespace geosample {
namespace solvers {
namespace {

using Buf = std::vector<float>;

// The counted denoiser, the AFS stand-in and the buffer updates shared by every solver.
struct Engine {
    const Denoiser& denoiser;
    std::size_t n;
    int calls = 0;

    Buf eval(const Buf& x, double sigma) {
        Buf out(n);
        denoiser(x.data(), sigma, out.data(), n);
        ++calls;
        return out;
    }

    // D(x, sigma), or the analytic first step D = x (1 - sigma / sqrt(1 + sigma^2)) without a call.
    Buf first(const Buf& x, double sigma, bool use_afs) {
        if (!use_afs) return eval(x, sigma);
        Buf out(n);
        lincomb(out.data(), 1.0 - sigma / std::sqrt(1.0 + sigma * sigma), x.data(), nullptr, nullptr, 0, n);
        return out;
    }

    // a x + sum_k b[k] H[k] (H newest first; b may be shorter than H).
    template <class Seq>
    Buf comb(double a, const Buf& x, const std::vector<double>& b, const Seq& H) const {
        std::vector<const float*> ptrs;
        for (std::size_t k = 0; k < b.size(); ++k) ptrs.push_back(H[k].data());
        Buf out(n);
        lincomb(out.data(), a, x.data(), b.data(), ptrs.data(), static_cast<int>(b.size()), n);
        return out;
    }

    // d = (x - D) / sigma
    Buf direction(const Buf& x, const Buf& denoised, double sigma) const {
        return comb(1.0 / sigma, x, {-1.0 / sigma}, std::vector<Buf>{denoised});
    }
};

// Keeps the newest `size` buffers, newest first.
void push(std::deque<Buf>& hist, Buf b, int size) {
    hist.push_front(std::move(b));
    while (static_cast<int>(hist.size()) > size) hist.pop_back();
}

using Grid = std::vector<double>;

void euler(Engine& e, Buf& x, const Grid& s, const Options& o) {
    for (std::size_t i = 0; i + 1 < s.size(); ++i) {
        const Buf d = e.direction(x, e.first(x, s[i], o.afs && i == 0), s[i]);
        x = e.comb(1.0, x, {s[i + 1] - s[i]}, std::vector<Buf>{d});
    }
}

// heun (r = 1, mid = next) and dpm2 (mid = s_next^r s^(1-r)): x_next = x + h ((1 - 1/2r) d + (1/2r) d_mid).
void two_stage(Engine& e, Buf& x, const Grid& s, const Options& o, bool heun) {
    const double r = heun ? 1.0 : o.r;
    for (std::size_t i = 0; i + 1 < s.size(); ++i) {
        const double h = s[i + 1] - s[i];
        const Buf d = e.direction(x, e.first(x, s[i], o.afs && i == 0), s[i]);
        const double mid = heun ? s[i + 1] : std::exp(r * std::log(s[i + 1]) + (1 - r) * std::log(s[i]));
        const Buf x_mid = e.comb(1.0, x, {mid - s[i]}, std::vector<Buf>{d});
        const Buf d_mid = e.direction(x_mid, e.eval(x_mid, mid), mid);
        x = e.comb(1.0, x, {h * (1 - 0.5 / r), h * (0.5 / r)}, std::vector<Buf>{d, d_mid});
    }
}

// ipndm, ipndm_v, deis: x_next = x + sum_k c_k d_{i-k}.
void adams(Engine& e, Buf& x, const Grid& s, const Options& o, const std::string& name, int max_order) {
    std::vector<std::vector<double>> table;
    if (name == "deis") table = deis_tab_coefficients(s, max_order);
    std::deque<Buf> ds;
    for (std::size_t i = 0; i + 1 < s.size(); ++i) {
        push(ds, e.direction(x, e.first(x, s[i], o.afs && i == 0), s[i]), max_order);
        const int k = static_cast<int>(ds.size()), step = static_cast<int>(i);
        const std::vector<double> c = name == "deis"   ? table[i]
                                      : name == "ipndm" ? ipndm_coefficients(s, step, k)
                                                        : ipndm_v_coefficients(s, step, k);
        x = e.comb(1.0, x, c, ds);
    }
}

void dpmpp(Engine& e, Buf& x, const Grid& s, const Options& o, int max_order) {
    const int steps = static_cast<int>(s.size()) - 1;
    std::deque<Buf> ms;
    for (int i = 0; i < steps; ++i) {
        push(ms, e.first(x, s[i], o.afs && i == 0), max_order);
        const int order = step_order(i, steps, max_order, o.lower_order_final);
        x = e.comb(s[i + 1] / s[i], x, dpmpp_coefficients(s, i, order), ms);
    }
}

// UniP predictor, then the UniC corrector with m_t = D(x_pred, s_next), reused by the next step;
// no corrector on the last step.
void unipc(Engine& e, Buf& x, const Grid& s, const Options& o, int max_order) {
    const int steps = static_cast<int>(s.size()) - 1;
    if (steps < 1) return;
    std::deque<Buf> ms;
    push(ms, e.first(x, s[0], o.afs), max_order);
    for (int i = 0; i < steps; ++i) {
        const int order = step_order(i, steps, max_order, o.lower_order_final);
        const UniPCCoefficients b = unipc_coefficients(s, i, order, o.variant);
        const double a = s[i + 1] / s[i];
        Buf x_pred = e.comb(a, x, b.predictor, ms);
        if (i == steps - 1) {
            x = std::move(x_pred);
            break;
        }
        Buf m_t = e.eval(x_pred, s[i + 1]);
        ms.push_front(m_t);
        x = e.comb(a, x, b.corrector, ms);  // over m_t, m_0, ..., m_{order-1}
        ms.pop_front();
        push(ms, std::move(m_t), max_order);
    }
}

void check_grid(const std::vector<double>& sigmas) {
    if (sigmas.size() < 2) throw std::invalid_argument("sigmas needs at least 2 entries (steps + 1)");
    for (std::size_t i = 0; i < sigmas.size(); ++i) {
        if (!std::isfinite(sigmas[i])) throw std::invalid_argument("sigmas must be finite (no NaN or inf)");
        if (sigmas[i] < 0 || (sigmas[i] == 0 && i + 1 < sigmas.size()))
            throw std::invalid_argument("sigmas must be positive (a trailing 0 is allowed)");
        if (i > 0 && !(sigmas[i] < sigmas[i - 1])) throw std::invalid_argument("sigmas must be strictly decreasing");
    }
}

int default_max_order(const std::string& solver) {
    if (solver == "ipndm" || solver == "ipndm_v" || solver == "deis") return 4;
    if (solver == "dpmpp" || solver == "unipc") return 3;
    return 1;
}

}  // namespace

void lincomb(float* out, double a, const float* x, const double* b, const float* const* H, int k, std::size_t n) {
    for (std::size_t j = 0; j < n; ++j) {
        double acc = x != nullptr ? a * x[j] : 0.0;
        for (int q = 0; q < k; ++q) acc += b[q] * H[q][j];
        out[j] = static_cast<float>(acc);
    }
}

const std::vector<std::string>& solver_names() {
    static const std::vector<std::string> names{"euler", "heun", "dpm2", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc"};
    return names;
}

int evals_per_step(const std::string& solver) {
    const auto& names = solver_names();
    if (std::find(names.begin(), names.end(), solver) == names.end()) {
        std::string valid;
        for (const auto& nm : names) valid += (valid.empty() ? "" : ", ") + nm;
        throw std::invalid_argument("unknown solver '" + solver + "'; valid solvers: " + valid);
    }
    return solver == "heun" || solver == "dpm2" ? 2 : 1;
}

int sample(const std::string& solver, const Denoiser& denoiser, std::vector<float>& x,
           const std::vector<double>& sigmas, const Options& options) {
    evals_per_step(solver);  // validates the name
    if (!denoiser) throw std::invalid_argument("denoiser must be callable");
    if (x.empty()) throw std::invalid_argument("x must not be empty");
    check_grid(sigmas);
    const int top = default_max_order(solver);
    const int max_order = options.max_order == 0 ? top : options.max_order;
    if (max_order < 1 || max_order > top)
        throw std::invalid_argument("max_order must be in [1, " + std::to_string(top) + "] for " + solver +
                                    ", got " + std::to_string(options.max_order));
    if (solver == "dpm2" && !(options.r > 0 && options.r <= 1))
        throw std::invalid_argument("dpm2 needs 0 < r <= 1, got r=" + std::to_string(options.r));
    if (solver == "unipc" && options.variant != "bh1" && options.variant != "bh2")
        throw std::invalid_argument("unipc variant must be 'bh1' or 'bh2', got '" + options.variant + "'");

    const bool final_denoise = sigmas.back() == 0.0;
    const Grid ode(sigmas.begin(), sigmas.end() - (final_denoise ? 1 : 0));
    Engine e{denoiser, x.size()};
    x = e.comb(sigmas[0], x, {}, std::vector<Buf>{});
    if (solver == "euler") euler(e, x, ode, options);
    else if (solver == "heun" || solver == "dpm2") two_stage(e, x, ode, options, solver == "heun");
    else if (solver == "dpmpp") dpmpp(e, x, ode, options, max_order);
    else if (solver == "unipc") unipc(e, x, ode, options, max_order);
    else adams(e, x, ode, options, solver, max_order);
    if (final_denoise) x = e.eval(x, ode.back());
    for (float v : x)
        if (!std::isfinite(v)) throw std::runtime_error("solver '" + solver + "' produced non-finite values");
    return e.calls;
}

}  // namespace solvers
}  // namespace geosample
