// WindowDecode: a DALI CPU operator that decodes only the crop window of a JPEG, mirrored where asked,
// straight into the output batch (dali_pipes/native.py builds and loads it; DESIGN.md, "The window decoder").
//
// Per picture: libjpeg-turbo reads the header, skips the rows above the window (entropy decoding only),
// decodes the window's rows one at a time into a row buffer of the thread (a few kB: it stays in the cache),
// and copies the window's columns from it into the output, in reverse order where the picture is mirrored.
// It stops after the window's last row. The pixels are those of the whole decode cut at the same place
// (same IDCT, same upsampling), so this graph yields what decode + crop + mirror yield.
// Pictures with an EXIF orientation other than 1, and CMYK/YCCK pictures, take a slow path: the whole
// picture decoded, oriented (and converted to RGB) while the window is cut.
#include <cstdio>  // jpeglib.h needs FILE
#include <csetjmp>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <jpeglib.h>
#if defined(__SSSE3__)
#include <tmmintrin.h>
#endif

#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "dali/pipeline/operator/common.h"

namespace cdiscount {

using ::dali::CPUBackend;
using ::dali::Workspace;

namespace {

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void OnError(j_common_ptr cinfo) {
  auto *err = reinterpret_cast<JpegError *>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void OnMessage(j_common_ptr, int) {}  // warnings (corrupt data the decoder can go on with) are not printed

// The window's first column (or row) for pos in [0, 1]: rounded half away from zero, as DALI's crop
// operators and pipelines.window_anchor round it.
int Anchor(float pos, int room) {
  double v = static_cast<double>(pos) * room;
  double a = std::floor(v);
  int anchor = static_cast<int>(a) + (v - a >= 0.5 ? 1 : 0);
  return anchor < 0 ? 0 : (anchor > room ? room : anchor);
}

unsigned Read16(const JOCTET *p, bool little) {
  return little ? p[0] | (p[1] << 8) : (p[0] << 8) | p[1];
}

unsigned Read32(const JOCTET *p, bool little) {
  return little ? Read16(p, true) | (Read16(p + 2, true) << 16) : (Read16(p, false) << 16) | Read16(p + 2, false);
}

// The EXIF orientation (1-8) from a saved APP1 marker; 1 where there is none or it does not parse.
int ExifOrientation(j_decompress_ptr cinfo) {
  for (jpeg_saved_marker_ptr m = cinfo->marker_list; m; m = m->next) {
    if (m->marker != JPEG_APP0 + 1 || m->data_length < 14 || std::memcmp(m->data, "Exif\0\0", 6) != 0)
      continue;
    const JOCTET *tiff = m->data + 6;
    unsigned n = m->data_length - 6;
    bool little = tiff[0] == 'I';
    unsigned ifd = Read32(tiff + 4, little);
    if (ifd + 2 > n) return 1;
    unsigned count = Read16(tiff + ifd, little);
    for (unsigned i = 0; i < count; i++) {
      unsigned e = ifd + 2 + 12 * i;
      if (e + 12 > n) break;
      if (Read16(tiff + e, little) == 0x0112) {
        unsigned v = Read16(tiff + e + 8, little);
        return v >= 1 && v <= 8 ? static_cast<int>(v) : 1;
      }
    }
  }
  return 1;
}

// Source pixel (x, y) of the stored picture (w x h) shown at (ox, oy) after EXIF orientation `o`.
inline void Oriented(int o, int w, int h, int ox, int oy, int *x, int *y) {
  switch (o) {
    case 2: *x = w - 1 - ox; *y = oy; break;
    case 3: *x = w - 1 - ox; *y = h - 1 - oy; break;
    case 4: *x = ox; *y = h - 1 - oy; break;
    case 5: *x = oy; *y = ox; break;
    case 6: *x = oy; *y = h - 1 - ox; break;
    case 7: *x = w - 1 - oy; *y = h - 1 - ox; break;
    case 8: *x = w - 1 - oy; *y = ox; break;
    default: *x = ox; *y = oy;
  }
}

struct Window {
  int height, width;
  float pos_x, pos_y;
  bool mirror;
};

// `dst` = the `width` RGB pixels at `src` in reverse order. With SSSE3, five pixels (15 bytes) at a time: one
// 16-byte load, one byte shuffle, one store (4-5x faster than a byte loop, as fast as a plain copy). The load
// of the first group reads one byte past the window (the row buffer has room for it); each 16-byte store
// writes one byte that the next group overwrites, so the last group and the rest go through smaller copies.
inline void MirrorRow(uint8_t *dst, const uint8_t *src, int width) {
  int c = 0;  // output pixels done
#if defined(__SSSE3__)
  const __m128i reverse5 = _mm_setr_epi8(12, 13, 14, 9, 10, 11, 6, 7, 8, 3, 4, 5, 0, 1, 2, 15);
  const int groups = width / 5;
  for (int g = 0; g < groups; g++, c += 5) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i *>(src + 3 * (width - 5 - c)));
    v = _mm_shuffle_epi8(v, reverse5);
    if (g + 1 < groups) {
      _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + 3 * c), v);
    } else {
      alignas(16) uint8_t last[16];
      _mm_store_si128(reinterpret_cast<__m128i *>(last), v);
      std::memcpy(dst + 3 * c, last, 15);
    }
  }
#endif
  for (; c < width; c++) {
    const uint8_t *p = src + 3 * (width - 1 - c);
    dst[3 * c] = p[0];
    dst[3 * c + 1] = p[1];
    dst[3 * c + 2] = p[2];
  }
}

// Decodes `win` of the JPEG in `data` into `out` (height x width x 3, uint8). Returns an empty string, or
// libjpeg's or this function's reason the picture cannot be decoded.
std::string DecodeWindow(const JOCTET *data, size_t size, const Window &win, uint8_t *out,
                         std::vector<JOCTET> *scratch) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = OnError;
  err.mgr.emit_message = OnMessage;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return err.message;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  int orientation = ExifOrientation(&cinfo);
  bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  const int w = cinfo.output_width, h = cinfo.output_height, channels = cinfo.output_components;
  const bool turned = orientation >= 5;
  const int shown_w = turned ? h : w, shown_h = turned ? w : h;
  if (shown_w < win.width || shown_h < win.height) {
    jpeg_destroy_decompress(&cinfo);
    return "picture of " + std::to_string(shown_w) + "x" + std::to_string(shown_h) +
           " is smaller than the window of " + std::to_string(win.width) + "x" + std::to_string(win.height);
  }
  const int ax = Anchor(win.pos_x, shown_w - win.width), ay = Anchor(win.pos_y, shown_h - win.height);
  const size_t row_bytes = static_cast<size_t>(w) * channels;

  if (orientation == 1 && !cmyk) {  // the fast path: the window's rows only
    const size_t out_row = static_cast<size_t>(win.width) * 3;
    scratch->resize(32 + 8 + row_bytes);
    // libjpeg-turbo's SIMD colour conversion writes a row that starts on a 16- or 32-byte boundary with
    // non-temporal stores, past the cache: reading it back then comes from memory (twice the CPU time per
    // picture, measured; which processes got it depended on where malloc put the buffer). A row buffer 8
    // bytes off those boundaries keeps its rows in the cache.
    JSAMPROW row = scratch->data() + (32 - reinterpret_cast<uintptr_t>(scratch->data()) % 32) % 32 + 8;
    if (ay > 0) jpeg_skip_scanlines(&cinfo, ay);
    for (int r = 0; r < win.height; r++) {
      jpeg_read_scanlines(&cinfo, &row, 1);
      const uint8_t *src = row + 3 * ax;
      uint8_t *dst = out + out_row * r;
      if (!win.mirror) {
        std::memcpy(dst, src, out_row);
        continue;
      }
      MirrorRow(dst, src, win.width);
    }
    jpeg_destroy_decompress(&cinfo);  // the rows below the window are never decoded
    return {};
  }

  // The slow path: the whole picture, then each window pixel fetched from where the orientation puts it.
  scratch->resize(row_bytes * h);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = scratch->data() + row_bytes * cinfo.output_scanline;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  // Adobe's CMYK JPEGs, which libjpeg hands over as stored, are inverted: R = C * K / 255 and so on.
  bool inverted = cmyk && cinfo.saw_Adobe_marker;
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  for (int r = 0; r < win.height; r++) {
    for (int c = 0; c < win.width; c++) {
      int x, y;
      Oriented(orientation, w, h, ax + (win.mirror ? win.width - 1 - c : c), ay + r, &x, &y);
      const JOCTET *p = scratch->data() + row_bytes * y + static_cast<size_t>(channels) * x;
      uint8_t *q = out + (static_cast<size_t>(r) * win.width + c) * 3;
      if (!cmyk) {
        q[0] = p[0]; q[1] = p[1]; q[2] = p[2];
      } else {
        int k = inverted ? p[3] : 255 - p[3];
        for (int i = 0; i < 3; i++) {
          int v = inverted ? p[i] : 255 - p[i];
          q[i] = static_cast<uint8_t>((v * k + 127) / 255);
        }
      }
    }
  }
  return {};
}

}  // namespace

class WindowDecode : public ::dali::StatelessOperator<CPUBackend> {
 public:
  explicit WindowDecode(const ::dali::OpSpec &spec) : StatelessOperator<CPUBackend>(spec) {
    auto window = spec.GetRepeatedArgument<int>("window");
    DALI_ENFORCE(window.size() == 2 && window[0] > 0 && window[1] > 0,
                 "window_decode: `window` is (height, width), both positive");
    height_ = window[0];
    width_ = window[1];
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const Workspace &ws) override {
    int n = ws.GetInputBatchSize(0);
    GetPerSampleArgument<float>(pos_x_, "crop_pos_x", ws, n);
    GetPerSampleArgument<float>(pos_y_, "crop_pos_y", ws, n);
    GetPerSampleArgument<int>(mirror_, "mirror", ws, n);
    output_desc.resize(1);
    output_desc[0].type = DALI_UINT8;
    output_desc[0].shape = ::dali::uniform_list_shape(n, {height_, width_, 3});
    return true;
  }

  void RunImpl(Workspace &ws) override {
    const auto &input = ws.Input<CPUBackend>(0);
    auto &output = ws.Output<CPUBackend>(0);
    output.SetLayout("HWC");
    auto &pool = ws.GetThreadPool();
    scratch_.resize(pool.NumThreads());
    int n = input.num_samples();
    for (int i = 0; i < n; i++) {
      pool.AddWork([&, i](int thread) {
        Window win{height_, width_, pos_x_[i], pos_y_[i], mirror_[i] != 0};
        std::string reason = DecodeWindow(input.tensor<uint8_t>(i), input.shape()[i].num_elements(), win,
                                          output.mutable_tensor<uint8_t>(i), &scratch_[thread]);
        if (!reason.empty()) {
          const std::string &where = input.GetMeta(i).GetSourceInfo();
          DALI_FAIL(::dali::make_string("window_decode: the JPEG of sample ", i, " (",
                                        where.empty() ? "source unknown" : where, ") does not decode: ", reason,
                                        ". Repack with --verify decode, which quarantines such pictures"));
        }
      }, -i);
    }
    pool.RunAll();
  }

 private:
  int height_ = 0, width_ = 0;
  std::vector<float> pos_x_, pos_y_;
  std::vector<int> mirror_;
  std::vector<std::vector<JOCTET>> scratch_;  // one per thread: a row, or a whole picture on the slow path
};

}  // namespace cdiscount

DALI_REGISTER_OPERATOR(WindowDecode, ::cdiscount::WindowDecode, ::dali::CPU);

DALI_SCHEMA(WindowDecode)
    .DocStr("Decodes the window of a JPEG (uint8 bytes in, uint8 HWC RGB out), mirrored where asked, with "
            "libjpeg-turbo: only the rows down to the window's last one are decoded")
    .NumInput(1)
    .NumOutput(1)
    .AddArg("window", "(height, width) of the window", DALI_INT_VEC)
    .AddOptionalArg("crop_pos_x", "window position across, 0 (left) to 1 (right)", 0.5f, true)
    .AddOptionalArg("crop_pos_y", "window position down, 0 (top) to 1 (bottom)", 0.5f, true)
    .AddOptionalArg("mirror", "non-zero: the window mirrored left to right", 0, true);
