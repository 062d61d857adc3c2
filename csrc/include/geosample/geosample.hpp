// geosample C++ core: schedules, the GITS dynamic programme and the ODE solvers.
// Plain C++17, standard library only. Link the CMake target geosample::core.
#pragma once

#include "geosample/gits.hpp"
#include "geosample/schedules.hpp"
#include "geosample/solvers.hpp"
#include "geosample/version.hpp"  // GEOSAMPLE_VERSION
