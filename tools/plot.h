// plot.h — the two charts `lancet sweep` draws, written as SVG (vector, for papers) and PNG
// (OpenCV raster, for a quick look). One drawing routine feeds both through a small canvas
// interface, so the two files always show the same thing.
#pragma once
#include <string>
#include <vector>

namespace lancet::cli {

struct Series {
  std::string label;
  std::vector<double> x, y;
  bool dashed = false;  // predicted series and the ideal line
  int color = -1;       // palette index; -1: the series' position
};

// A line chart: each series a polyline with markers (dashed ones without), linear axes from 0.
struct LineChart {
  std::string title, x_label, y_label;
  std::vector<Series> series;
};

// Stacked bars: one bar per label, one stack segment per component.
struct StackedBars {
  std::string title, y_label;
  std::vector<std::string> bars;                 // bar labels
  std::vector<std::string> components;           // legend, bottom to top
  std::vector<std::vector<double>> values;       // values[bar][component]
};

// Write `base`.svg and `base`.png; throw lancet::Error naming the file on failure. Several
// charts side by side (e.g. speedup and efficiency) go into one figure.
void write_line_charts(const std::vector<LineChart>& charts, const std::string& base);
void write_stacked_bars(const StackedBars& chart, const std::string& base);

}  // namespace lancet::cli
