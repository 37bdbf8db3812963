#include "tools/plot.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <memory>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <sstream>

#include "kernels/error.h"

namespace lancet::cli {

namespace {

struct Color {
  int r, g, b;
};
const Color kBlack{0, 0, 0}, kGrey{200, 200, 200}, kWhite{255, 255, 255};
const Color kPalette[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},  {214, 39, 40},
                          {148, 103, 189}, {140, 86, 75},  {227, 119, 194}, {127, 127, 127}};
Color palette(size_t i) { return kPalette[i % (sizeof(kPalette) / sizeof(kPalette[0]))]; }

// anchor: -1 left, 0 centre, 1 right (horizontal); y is the text's baseline.
class Canvas {
 public:
  virtual ~Canvas() = default;
  virtual void line(double x1, double y1, double x2, double y2, Color c, double width, bool dashed) = 0;
  virtual void rect(double x, double y, double w, double h, Color fill) = 0;
  virtual void circle(double x, double y, double r, Color c) = 0;
  virtual void text(double x, double y, const std::string& s, double size, int anchor) = 0;
};

std::string hex(Color c) {
  std::ostringstream o;
  o << "#" << std::hex << std::setfill('0') << std::setw(2) << c.r << std::setw(2) << c.g << std::setw(2) << c.b;
  return o.str();
}

std::string xml_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '<') o += "&lt;";
    else if (ch == '>') o += "&gt;";
    else if (ch == '&') o += "&amp;";
    else if (ch == '"') o += "&quot;";
    else o += ch;
  }
  return o;
}

class SvgCanvas : public Canvas {
 public:
  SvgCanvas(int w, int h) : w_(w), h_(h) {}
  void line(double x1, double y1, double x2, double y2, Color c, double width, bool dashed) override {
    body_ << "<line x1=\"" << x1 << "\" y1=\"" << y1 << "\" x2=\"" << x2 << "\" y2=\"" << y2 << "\" stroke=\"" << hex(c)
          << "\" stroke-width=\"" << width << "\"" << (dashed ? " stroke-dasharray=\"6,4\"" : "") << "/>\n";
  }
  void rect(double x, double y, double w, double h, Color fill) override {
    body_ << "<rect x=\"" << x << "\" y=\"" << y << "\" width=\"" << w << "\" height=\"" << h << "\" fill=\"" << hex(fill)
          << "\"/>\n";
  }
  void circle(double x, double y, double r, Color c) override {
    body_ << "<circle cx=\"" << x << "\" cy=\"" << y << "\" r=\"" << r << "\" fill=\"" << hex(c) << "\"/>\n";
  }
  void text(double x, double y, const std::string& s, double size, int anchor) override {
    const char* a = anchor < 0 ? "start" : anchor == 0 ? "middle" : "end";
    body_ << "<text x=\"" << x << "\" y=\"" << y << "\" font-size=\"" << size << "\" text-anchor=\"" << a
          << "\" font-family=\"sans-serif\">" << xml_escape(s) << "</text>\n";
  }
  void save(const std::string& path) const {
    std::ofstream f(path);
    LANCET_CHECK(f, path << ": cannot write");
    f << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << w_ << "\" height=\"" << h_ << "\" viewBox=\"0 0 " << w_
      << " " << h_ << "\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << body_.str() << "</svg>\n";
    f.close();
    LANCET_CHECK(f, path << ": write failed");
  }

 private:
  int w_, h_;
  std::ostringstream body_;
};

class PngCanvas : public Canvas {
 public:
  PngCanvas(int w, int h) : img_(h, w, CV_8UC3, cv::Scalar(255, 255, 255)) {}
  static cv::Scalar bgr(Color c) { return cv::Scalar(c.b, c.g, c.r); }
  void line(double x1, double y1, double x2, double y2, Color c, double width, bool dashed) override {
    const int t = std::max(1, static_cast<int>(std::lround(width)));
    if (!dashed) {
      cv::line(img_, {ix(x1), ix(y1)}, {ix(x2), ix(y2)}, bgr(c), t, cv::LINE_AA);
      return;
    }
    const double len = std::hypot(x2 - x1, y2 - y1);
    for (double s = 0; s < len; s += 10) {
      const double e = std::min(len, s + 6);
      cv::line(img_, {ix(x1 + (x2 - x1) * s / len), ix(y1 + (y2 - y1) * s / len)},
               {ix(x1 + (x2 - x1) * e / len), ix(y1 + (y2 - y1) * e / len)}, bgr(c), t, cv::LINE_AA);
    }
  }
  void rect(double x, double y, double w, double h, Color fill) override {
    cv::rectangle(img_, cv::Rect(ix(x), ix(y), std::max(1, ix(w)), std::max(1, ix(h))), bgr(fill), cv::FILLED);
  }
  void circle(double x, double y, double r, Color c) override {
    cv::circle(img_, {ix(x), ix(y)}, std::max(1, ix(r)), bgr(c), cv::FILLED, cv::LINE_AA);
  }
  void text(double x, double y, const std::string& s, double size, int anchor) override {
    const double scale = size / 28.0;
    int base = 0;
    const cv::Size ts = cv::getTextSize(s, cv::FONT_HERSHEY_SIMPLEX, scale, 1, &base);
    const double x0 = anchor < 0 ? x : anchor == 0 ? x - ts.width / 2.0 : x - ts.width;
    cv::putText(img_, s, {ix(x0), ix(y)}, cv::FONT_HERSHEY_SIMPLEX, scale, bgr(kBlack), 1, cv::LINE_AA);
  }
  void save(const std::string& path) const {
    bool ok = false;
    try {
      ok = cv::imwrite(path, img_);
    } catch (const cv::Exception& e) {
      LANCET_FAIL(path << ": cannot write PNG: " << e.what());
    }
    LANCET_CHECK(ok, path << ": cannot write PNG");
  }

 private:
  static int ix(double v) { return static_cast<int>(std::lround(v)); }
  cv::Mat img_;
};

// A round tick step giving about `n` intervals up to `max`.
double nice_step(double max, int n) {
  if (!(max > 0)) return 1;
  const double raw = max / n;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

std::string fmt(double v) {
  std::ostringstream o;
  if (std::fabs(v - std::round(v)) < 1e-9)
    o << static_cast<long long>(std::llround(v));
  else
    o << std::setprecision(3) << v;
  return o.str();
}

constexpr double kPanelW = 520, kPanelH = 380, kLeft = 64, kRight = 20, kTop = 44, kBottom = 52;

void draw_axes(Canvas& c, double ox, double xmax, double ymax, double xstep, double ystep, const std::string& title,
               const std::string& xl, const std::string& yl) {
  const double pw = kPanelW - kLeft - kRight, ph = kPanelH - kTop - kBottom;
  const double x0 = ox + kLeft, y0 = kTop + ph;
  for (double v = 0; v <= ymax + 1e-9; v += ystep) {
    const double y = y0 - v / ymax * ph;
    c.line(x0, y, x0 + pw, y, kGrey, 1, false);
    c.text(x0 - 6, y + 4, fmt(v), 12, 1);
  }
  for (double v = 0; v <= xmax + 1e-9; v += xstep) {
    const double x = x0 + v / xmax * pw;
    c.line(x, y0, x, y0 + 5, kBlack, 1, false);
    c.text(x, y0 + 20, fmt(v), 12, 0);
  }
  c.line(x0, y0, x0 + pw, y0, kBlack, 1.5, false);
  c.line(x0, y0, x0, kTop, kBlack, 1.5, false);
  c.text(ox + kPanelW / 2, 22, title, 15, 0);
  c.text(x0 + pw / 2, kPanelH - 12, xl, 13, 0);
  c.text(x0 + 4, kTop - 6, yl, 12, -1);
}

void draw_line_chart(Canvas& c, const LineChart& ch, double ox) {
  double xmax = 0, ymax = 0;
  for (const auto& s : ch.series)
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (std::isfinite(s.x[i])) xmax = std::max(xmax, s.x[i]);
      if (std::isfinite(s.y[i])) ymax = std::max(ymax, s.y[i]);
    }
  const double xstep = nice_step(xmax > 0 ? xmax : 1, 6), ystep = nice_step(ymax > 0 ? ymax * 1.05 : 1, 5);
  xmax = std::max(xstep, std::ceil(xmax / xstep - 1e-9) * xstep);
  ymax = std::max(ystep, std::ceil(ymax * 1.05 / ystep - 1e-9) * ystep);
  draw_axes(c, ox, xmax, ymax, xstep, ystep, ch.title, ch.x_label, ch.y_label);
  const double pw = kPanelW - kLeft - kRight, ph = kPanelH - kTop - kBottom;
  auto X = [&](double v) { return ox + kLeft + v / xmax * pw; };
  auto Y = [&](double v) { return kTop + ph - v / ymax * ph; };
  for (size_t k = 0; k < ch.series.size(); ++k) {
    const Series& s = ch.series[k];
    const Color col = s.label == "ideal" ? Color{90, 90, 90} : palette(s.color >= 0 ? static_cast<size_t>(s.color) : k);
    for (size_t i = 0; i + 1 < s.x.size() && i + 1 < s.y.size(); ++i)
      if (std::isfinite(s.y[i]) && std::isfinite(s.y[i + 1]))
        c.line(X(s.x[i]), Y(s.y[i]), X(s.x[i + 1]), Y(s.y[i + 1]), col, 2, s.dashed);
    if (!s.dashed)
      for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
        if (std::isfinite(s.y[i])) c.circle(X(s.x[i]), Y(s.y[i]), 3.5, col);
    // Legend, top left inside the plot.
    const double ly = kTop + 16 + 17 * static_cast<double>(k), lx = ox + kLeft + 10;
    c.line(lx, ly - 4, lx + 22, ly - 4, col, 2, s.dashed);
    c.text(lx + 28, ly, s.label, 12, -1);
  }
}

template <class Draw>
void save_both(int w, int h, const std::string& base, Draw draw) {
  SvgCanvas svg(w, h);
  draw(static_cast<Canvas&>(svg));
  svg.save(base + ".svg");
  PngCanvas png(w, h);
  draw(static_cast<Canvas&>(png));
  png.save(base + ".png");
}

}  // namespace

void write_line_charts(const std::vector<LineChart>& charts, const std::string& base) {
  LANCET_CHECK(!charts.empty(), base << ": nothing to plot");
  save_both(static_cast<int>(kPanelW * charts.size()), static_cast<int>(kPanelH), base, [&](Canvas& c) {
    for (size_t i = 0; i < charts.size(); ++i) draw_line_chart(c, charts[i], kPanelW * i);
  });
}

void write_stacked_bars(const StackedBars& ch, const std::string& base) {
  LANCET_CHECK(!ch.bars.empty() && ch.values.size() == ch.bars.size(), base << ": nothing to plot");
  const double bar_w = 46, gap = 22, legend_w = 150;
  const double w = std::max(kPanelW, kLeft + kRight + legend_w + (bar_w + gap) * ch.bars.size() + gap);
  save_both(static_cast<int>(w), static_cast<int>(kPanelH + 40), base, [&](Canvas& c) {
    double ymax = 0;
    for (const auto& v : ch.values) {
      double t = 0;
      for (double x : v) t += std::max(0.0, x);
      ymax = std::max(ymax, t);
    }
    const double ystep = nice_step(ymax > 0 ? ymax * 1.05 : 1, 5);
    ymax = std::max(ystep, std::ceil(ymax * 1.05 / ystep - 1e-9) * ystep);
    const double ph = kPanelH - kTop - kBottom, y0 = kTop + ph, x0 = kLeft;
    for (double v = 0; v <= ymax + 1e-9; v += ystep) {
      const double y = y0 - v / ymax * ph;
      c.line(x0, y, w - kRight - legend_w, y, kGrey, 1, false);
      c.text(x0 - 6, y + 4, fmt(v), 12, 1);
    }
    c.line(x0, y0, w - kRight - legend_w, y0, kBlack, 1.5, false);
    c.line(x0, y0, x0, kTop, kBlack, 1.5, false);
    c.text((w - legend_w) / 2, 22, ch.title, 15, 0);
    c.text(x0 + 4, kTop - 6, ch.y_label, 12, -1);
    for (size_t b = 0; b < ch.bars.size(); ++b) {
      const double x = x0 + gap + (bar_w + gap) * b;
      double acc = 0;
      for (size_t k = 0; k < ch.components.size() && k < ch.values[b].size(); ++k) {
        const double v = std::max(0.0, ch.values[b][k]);
        if (v <= 0) continue;
        c.rect(x, y0 - (acc + v) / ymax * ph, bar_w, v / ymax * ph, palette(k));
        acc += v;
      }
      // Labels like "2x1 fp32" may be long: split at spaces over lines.
      std::istringstream words(ch.bars[b]);
      std::string word;
      double ly = y0 + 16;
      while (words >> word) {
        c.text(x + bar_w / 2, ly, word, 11, 0);
        ly += 13;
      }
    }
    for (size_t k = 0; k < ch.components.size(); ++k) {
      const double lx = w - kRight - legend_w + 16, ly = kTop + 14 + 18 * static_cast<double>(ch.components.size() - 1 - k);
      c.rect(lx, ly - 10, 12, 12, palette(k));
      c.text(lx + 18, ly, ch.components[k], 12, -1);
    }
  });
}

}  // namespace lancet::cli
