#pragma once
// Umbrella header of the pnewton C++ API. Link the pnewton library (which registers the ops).
#include "pnewton/scan.h"
