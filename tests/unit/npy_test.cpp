#include "grace/npy.hpp"

#include <gtest/gtest.h>

#include <cstring>

#include "grace/error.hpp"
#include "test_util.hpp"

namespace grace {
namespace {

using testing::make_npy;
using testing::TempDir;
using testing::write_bytes;

std::string le32(std::initializer_list<int32_t> v) {
    std::string s;
    for (int32_t x : v) s.append(reinterpret_cast<const char*>(&x), 4);
    return s;
}

std::string be16(std::initializer_list<int16_t> v) {
    std::string s;
    for (int16_t x : v) {
        s += static_cast<char>((static_cast<uint16_t>(x) >> 8) & 0xff);
        s += static_cast<char>(static_cast<uint16_t>(x) & 0xff);
    }
    return s;
}

TEST(Npy, ReadsLittleEndianInt32) {
    TempDir dir;
    write_bytes(dir.file("a.npy"), make_npy("<i4", "(2, 3)", le32({1, 2, 3, 4, 5, 6})));
    std::vector<int64_t> shape;
    auto v = read_npy_int(dir.file("a.npy"), &shape);
    EXPECT_EQ(shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(v, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
}

TEST(Npy, ReadsBigEndianInt16) {
    TempDir dir;
    write_bytes(dir.file("b.npy"), make_npy(">i2", "(4,)", be16({-3, 7, 300, 0})));
    auto v = read_npy_int(dir.file("b.npy"));
    EXPECT_EQ(v, (std::vector<int64_t>{-3, 7, 300, 0}));
}

TEST(Npy, ReadsUint8AndFloat16) {
    TempDir dir;
    write_bytes(dir.file("u.npy"), make_npy("|u1", "(3,)", std::string("\x05\x00\xff", 3)));
    EXPECT_EQ(read_npy_int(dir.file("u.npy")), (std::vector<int64_t>{5, 0, 255}));
    // 1.0 = 0x3c00, -2.0 = 0xc000, 0.5 = 0x3800 (little-endian half floats)
    write_bytes(dir.file("h.npy"), make_npy("<f2", "(3,)", std::string("\x00\x3c\x00\xc0\x00\x38", 6)));
    EXPECT_EQ(read_npy_float(dir.file("h.npy")), (std::vector<double>{1.0, -2.0, 0.5}));
}

TEST(Npy, RoundTripsEveryWriter) {
    TempDir dir;
    write_npy(dir.file("i.npy"), std::vector<int32_t>{1, -2, 3, 4}, {2, 2});
    write_npy(dir.file("l.npy"), std::vector<int64_t>{1LL << 40, -5}, {2});
    write_npy(dir.file("f.npy"), std::vector<float>{0.25f, -1.5f}, {1, 2});
    write_npy(dir.file("d.npy"), std::vector<double>{3.5}, {1});
    std::vector<int64_t> shape;
    EXPECT_EQ(read_npy_int(dir.file("i.npy"), &shape), (std::vector<int64_t>{1, -2, 3, 4}));
    EXPECT_EQ(shape, (std::vector<int64_t>{2, 2}));
    EXPECT_EQ(read_npy_int(dir.file("l.npy")), (std::vector<int64_t>{1LL << 40, -5}));
    EXPECT_EQ(read_npy_float(dir.file("f.npy")), (std::vector<double>{0.25, -1.5}));
    EXPECT_EQ(read_npy_float(dir.file("d.npy")), (std::vector<double>{3.5}));
    // The header's data offset is 64-byte aligned, as NumPy writes it.
    EXPECT_EQ(read_npy_header(dir.file("i.npy")).data_offset % 64, 0);
}

TEST(Npy, StreamsRowsInChunks) {
    TempDir dir;
    std::vector<int32_t> data(30);
    for (int i = 0; i < 30; ++i) data[i] = i;
    write_npy(dir.file("s.npy"), data, {10, 3});
    NpyRowReader reader(dir.file("s.npy"));
    EXPECT_EQ(reader.num_rows(), 10);
    EXPECT_EQ(reader.row_size(), 3);
    std::vector<int64_t> chunk, all;
    while (reader.read_int(4, chunk) > 0) all.insert(all.end(), chunk.begin(), chunk.end());
    ASSERT_EQ(all.size(), 30u);
    for (int i = 0; i < 30; ++i) EXPECT_EQ(all[i], i);
}

void expect_input_error(const std::string& path, const std::string& fragment) {
    try {
        read_npy_int(path);
        FAIL() << "expected an error mentioning '" << fragment << "'";
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kInvalidInput) << e.what();
        EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
}

TEST(Npy, RejectsTruncatedFortranAndForeignFiles) {
    TempDir dir;
    std::string full = make_npy("<i4", "(2, 3)", le32({1, 2, 3, 4, 5, 6}));
    write_bytes(dir.file("trunc.npy"), full.substr(0, full.size() - 5));
    expect_input_error(dir.file("trunc.npy"), "truncated");
    write_bytes(dir.file("hdr.npy"), full.substr(0, 20));
    expect_input_error(dir.file("hdr.npy"), "truncated");
    write_bytes(dir.file("f.npy"), make_npy("<i4", "(2, 3)", le32({1, 2, 3, 4, 5, 6}), true));
    expect_input_error(dir.file("f.npy"), "Fortran");
    write_bytes(dir.file("text.npy"), "hello, this is not numpy");
    expect_input_error(dir.file("text.npy"), "not a .npy");
    write_bytes(dir.file("c.npy"), make_npy("<c8", "(1,)", std::string(8, '\0')));
    expect_input_error(dir.file("c.npy"), "unsupported dtype");
    write_bytes(dir.file("frac.npy"), make_npy("<f8", "(1,)", std::string("\x00\x00\x00\x00\x00\x00\xe0\x3f", 8)));
    expect_input_error(dir.file("frac.npy"), "whole numbers");
    EXPECT_THROW(read_npy_int(dir.file("missing.npy")), Error);
}

TEST(NpyLimits, ShapeWhoseSizeOverflowsIsRejectedNotWrapped) {
    TempDir dir;
    // 2^32 x 2^32 elements wrap to 0 in 64 bits, which used to pass the truncation check with no payload at all.
    write_bytes(dir.file("wrap.npy"), make_npy("<i4", "(4294967296, 4294967296)", ""));
    EXPECT_EQ(testing::error_of([&] { read_npy_header(dir.file("wrap.npy")); }),
              dir.file("wrap.npy") + ": shape 4294967296 x 4294967296 of 4-byte elements overflows a 64-bit size");
    // The product fits but the bytes do not (2^62 elements of 4 bytes).
    write_bytes(dir.file("bytes.npy"), make_npy("<i4", "(4611686018427387904,)", ""));
    EXPECT_NE(testing::error_of([&] { read_npy_int(dir.file("bytes.npy")); }).find("overflows a 64-bit size"),
              std::string::npos);
    // Large but representable: a plain truncation error naming the bytes the shape needs.
    write_bytes(dir.file("big.npy"), make_npy("<i4", "(1000000, 1000000)", ""));
    EXPECT_NE(testing::error_of([&] { read_npy_int(dir.file("big.npy")); }).find("shape needs 4000000000"),
              std::string::npos);
}

TEST(Npy, FolderAndMissingFileSayWhatTheyAre) {
    // A folder opens on Linux and used to fail as "bad magic"; a missing file said only "cannot open".
    TempDir dir;
    std::filesystem::create_directories(dir.file("folder.npy"));
    for (const std::string& name : {"folder.npy", "missing.npy"}) {
        const std::string path = dir.file(name);
        try {
            read_npy_header(path);
            ADD_FAILURE() << name << " was read";
        } catch (const Error& e) {
            EXPECT_EQ(e.code(), ErrorCode::kIo);
            const std::string want = name == "folder.npy" ? ": is a folder, not a .npy file" : ": no such file";
            EXPECT_EQ(std::string(e.what()), path + want);
        }
    }
}

TEST(Npy, WriterRefusesMissingFolderAndLeavesNothing) {
    TempDir dir;
    try {
        write_npy(dir.file("nope/x.npy"), std::vector<int32_t>{1}, {1});
        FAIL();
    } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kIo);
        EXPECT_NE(std::string(e.what()).find("does not exist"), std::string::npos);
    }
    EXPECT_THROW(write_npy(dir.file("bad.npy"), std::vector<int32_t>{1, 2}, {3}), Error);
    EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

}  // namespace
}  // namespace grace
