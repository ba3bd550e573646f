#pragma once
// Umbrella header of the pnewton C++ API. Link the pnewton library (which registers the ops):
// with CMake, find_package(pnewton) and target_link_libraries(app pnewton::pnewton).
#include "pnewton/cell.h"
#include "pnewton/nn.h"
#include "pnewton/scan.h"
#include "pnewton/solver.h"
